"""Composability: the Attention samplers with ComfyUI's model patches, guiders, conditioning nodes and latent modes.

Every case runs two API-format prompts through ComfyUI's PromptExecutor on the tiny SD1.5 model:
  - the guided prompt: the case's sampling with an Attention Guidance (A&E, scale 20, steps [0, 0.5));
  - the check prompt: the same sampling without GUIDANCE (the pack's sampler only records maps), the plain
    KSampler (or SamplerCustomAdvanced with KSamplerSelect) with the same patches, and, where the positive is
    not the subject prompt alone, a capture-only run whose positive is the subject prompt alone.
Each case is then checked by one test per property, so a failure names what broke:
  1. everything runs and is finite;
  2. guidance acts: the guided latent differs from the plain one;
  3. without GUIDANCE the pack's sampler gives the plain sampler's latent bit for bit and records no loss;
  4. the maps recorded at step 0 are the subject prompt's. A second conditioning changes the sampler's output
     only from step 1 on, so step 0's maps depend only on the noise and the subject prompt;
  5. the recorded maps keep AttentionRecord's contract: each pixel sums to 1 over the tokens.
Then: SUBJECTS from another encode than the positive is a clear error, a guided range that covers no step is
reported, and for every ComfyUI sampler a GUIDANCE with scale_factor 0 leaves KSampler's latent exactly.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import pytest
import torch
from harness import WorkflowError, pack_module

import comfy.samplers

SEED = 3
CFG = 7.5
STEPS = 4
TEXT, SUBJECTS = "a cat and a frog", "cat, frog"
OTHER = "a red house"
NEGATIVE = "blurry"
# ConditioningConcat of two encodes equals the encode of the joined text when the first text fills its 77-token
# chunk exactly (start + 75 tokens + end): the concat cases use texts padded to 75 tokens ("very" is one token)
FILL = " very" * 70
TEXT_75, OTHER_75 = TEXT + FILL, OTHER + FILL + " very" * 2  # 5 and 3 tokens of their own
LORA_NAME = "attn_guide_composability_lora.safetensors"
MAP_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


# ---------------------------------------------------------------- prompt building

class Graph(dict):
    """An API-format prompt under construction: `add` appends a node and returns a handle to its outputs."""

    def add(self, class_type: str, **inputs) -> "Outputs":
        node_id = str(len(self) + 1)
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return Outputs(node_id)

    def capture(self, label: str, value) -> None:
        if value is not None:
            self.add("TestCapture", label=label, value=value)


class Outputs:
    def __init__(self, node_id: str):
        self.node_id = node_id

    def __getitem__(self, index: int) -> list:
        return [self.node_id, index]


def guidance_node(g: Graph, scale_factor=20.0, guidance_end=0.5, refinement="0.0:0.05") -> list:
    weights = {f"{name}_weight": float(name == "attend_and_excite") for name in pack_module("guidance.losses").LOSSES}
    return g.add("AttnGuideGuidance", **weights, scale_factor=scale_factor, guidance_start=0.0,
                 guidance_end=guidance_end, refinement=refinement, max_refinement_steps=2,
                 softmax_temperature=100.0, exclude_padding=False, smoothing_sigma=0.5, retention_threshold=0.5,
                 truncate_pass=True)[0]


@dataclass(frozen=True)
class Case:
    patches: tuple = ()           # (class_type, inputs) applied to the MODEL in this order
    conditioning: str = "subject"  # key of CONDITIONINGS: how the positive is made from the subject prompt
    guider: str | None = None      # key of GUIDERS: sample with SamplerCustomAdvanced and this guider
    latent: str = "empty"          # key of LATENTS
    width: int = 128               # px: a 16x16 latent, 4x4 maps
    height: int = 128
    batch: int = 1
    steps: int = STEPS
    sampler: str = "euler"


class Setup:
    """The nodes every sampling of a case shares."""

    def __init__(self, g: Graph, case: Case):
        self.case = case
        loader = g.add("TinyCheckpointLoader", family="sd15", seed=0)
        self.clip, self.vae = loader[1], loader[2]
        self.model = loader[0]
        for class_type, inputs in case.patches:
            self.model = g.add(class_type, model=self.model, **inputs)[0]
        self.negative = g.add("CLIPTextEncode", clip=self.clip, text=NEGATIVE)[0]
        # positive, subjects; the reference positive and subjects (None: the positive is the subject prompt alone)
        self.positive, self.subjects, self.reference = CONDITIONINGS[case.conditioning](g, self.clip)
        self.latent, self.denoise = LATENTS[case.latent](g, self)
        if case.guider is not None:
            self.guider = GUIDERS[case.guider](g, self)
            self.noise = g.add("RandomNoise", noise_seed=SEED)[0]
            self.sigmas = g.add("BasicScheduler", model=self.model, scheduler="normal", steps=case.steps,
                                denoise=self.denoise)[0]

    def ksampler(self, g: Graph, plain=False, guidance=None, positive=None, subjects=None):
        """KSampler (plain) or Attention KSampler: (LATENT, ATTENTION or None)."""
        case = self.case
        common = dict(model=self.model, seed=SEED, steps=case.steps, cfg=CFG, sampler_name=case.sampler,
                      scheduler="normal", positive=positive or self.positive, negative=self.negative,
                      latent_image=self.latent, denoise=self.denoise)
        if plain:
            return g.add("KSampler", **common)[0], None
        extra = {"guidance": guidance} if guidance is not None else {}
        node = g.add("AttnGuideKSampler", **common, subjects=subjects or self.subjects, attention_resolution=0,
                     record_maps=True, **extra)
        return node[0], node[1]

    def custom(self, g: Graph, plain=False, guidance=None):
        """SamplerCustomAdvanced with KSamplerSelect (plain) or an Attention Sampler: (LATENT, ATTENTION or None)."""
        if plain:
            sampler = g.add("KSamplerSelect", sampler_name=self.case.sampler)[0]
        else:
            extra = {"guidance": guidance} if guidance is not None else {}
            sampler = g.add("AttnGuideSampler", sampler_name=self.case.sampler, subjects=self.subjects,
                            attention_resolution=0, record_maps=True, **extra)[0]
        latent = g.add("SamplerCustomAdvanced", noise=self.noise, guider=self.guider, sampler=sampler,
                       sigmas=self.sigmas, latent_image=self.latent)[0]
        attention = None if plain else g.add("AttnGuideSamplerAttention", sampler=sampler, latent=latent)[0]
        return latent, attention

    def sample(self, g: Graph, **kwargs):
        return (self.custom if self.case.guider is not None else self.ksampler)(g, **kwargs)


def guided_prompt(case: Case) -> Graph:
    g = Graph()
    setup = Setup(g, case)
    latent, attention = setup.sample(g, guidance=guidance_node(g))
    g.capture("guided", latent)
    g.capture("guided_attention", attention)
    return g


def check_prompt(case: Case) -> Graph:
    g = Graph()
    setup = Setup(g, case)
    latent, attention = setup.sample(g)
    g.capture("unguided", latent)
    g.capture("unguided_attention", attention)
    g.capture("plain", setup.sample(g, plain=True)[0])
    if setup.reference is not None or case.guider is not None:
        positive, subjects = setup.reference or (None, None)
        g.capture("reference_attention", setup.ksampler(g, positive=positive, subjects=subjects)[1])
    return g


# ---------------------------------------------------------------- the cases' parts

def _subject_alone(g, clip):
    encode = g.add("AttnGuideTextEncode", clip=clip, text=TEXT, subjects=SUBJECTS)
    return encode[0], encode[1], None


def _paired(g, clip, *, subject_first, node, inputs, modify=None, texts=(TEXT, OTHER), joined=False):
    """The subject prompt and another prompt (optionally modified) into `node`, subject first or second.

    Reference: the subject prompt alone, or for a concat the joined text (its tokens laid out as the concat's)."""
    subject = g.add("AttnGuideTextEncode", clip=clip, text=texts[0], subjects=SUBJECTS)
    other = g.add("CLIPTextEncode", clip=clip, text=texts[1])[0]
    if modify is not None:
        other = modify(g, other)
    pair = (subject[0], other) if subject_first else (other, subject[0])
    positive = g.add(node, **dict(zip(inputs, pair)))[0]
    reference = subject
    if joined:
        reference = g.add("AttnGuideTextEncode", clip=clip, text=" ".join(texts if subject_first else texts[::-1]),
                          subjects=SUBJECTS)
    return positive, subject[1], (reference[0], reference[1])


def _area(g, cond):
    return g.add("ConditioningSetArea", conditioning=cond, width=64, height=64, x=0, y=0, strength=1.0)[0]


def _timestep_range(g, cond):
    return g.add("ConditioningSetTimestepRange", conditioning=cond, start=0.0, end=0.5)[0]


_COMBINE = {"node": "ConditioningCombine", "inputs": ("conditioning_1", "conditioning_2")}
PAIRINGS = {
    "combine": _COMBINE,
    "concat": {"node": "ConditioningConcat", "inputs": ("conditioning_to", "conditioning_from"),
               "texts": (TEXT_75, OTHER_75), "joined": True},
    "set_area": {**_COMBINE, "modify": _area},            # the other prompt on the top-left quarter
    "timestep_range": {**_COMBINE, "modify": _timestep_range},  # the other prompt over the first half
}
CONDITIONINGS = {
    "subject": _subject_alone,
    **{f"{name}_subject_{order}": functools.partial(_paired, subject_first=order == "first", **pairing)
       for name, pairing in PAIRINGS.items() for order in ("first", "second")},
}


def _empty(g, s):
    return g.add("EmptyLatentImage", width=s.case.width, height=s.case.height, batch_size=s.case.batch)[0], 1.0


def _image(g, s):
    return g.add("EmptyImage", width=s.case.width, height=s.case.height, batch_size=s.case.batch, color=0x8040C0)[0]


def _square_mask(g, s):
    """0 everywhere, 1 in the centred square of half the side."""
    w, h = s.case.width, s.case.height
    outside = g.add("SolidMask", value=0.0, width=w, height=h)[0]
    inside = g.add("SolidMask", value=1.0, width=w // 2, height=h // 2)[0]
    return g.add("MaskComposite", destination=outside, source=inside, x=w // 4, y=h // 4, operation="add")[0]


def _img2img(g, s):
    return g.add("VAEEncode", pixels=_image(g, s), vae=s.vae)[0], 0.6


def _inpaint_noise_mask(g, s):
    encoded = g.add("VAEEncode", pixels=_image(g, s), vae=s.vae)[0]
    return g.add("SetLatentNoiseMask", samples=encoded, mask=_square_mask(g, s))[0], 1.0


def _inpaint_vae_encode(g, s):
    return g.add("VAEEncodeForInpaint", pixels=_image(g, s), vae=s.vae, mask=_square_mask(g, s),
                 grow_mask_by=6)[0], 1.0


LATENTS = {"empty": _empty, "img2img": _img2img, "inpaint_noise_mask": _inpaint_noise_mask,
           "inpaint_vae_encode": _inpaint_vae_encode}


def _empty_prompt(g, s):
    return g.add("CLIPTextEncode", clip=s.clip, text="")[0]


def _other(g, s):
    return g.add("CLIPTextEncode", clip=s.clip, text=OTHER)[0]


GUIDERS = {
    "CFGGuider": lambda g, s: g.add("CFGGuider", model=s.model, positive=s.positive, negative=s.negative,
                                    cfg=CFG)[0],
    "BasicGuider": lambda g, s: g.add("BasicGuider", model=s.model, conditioning=s.positive)[0],
    "DualCFGGuider": lambda g, s: g.add("DualCFGGuider", model=s.model, cond1=s.positive, cond2=_other(g, s),
                                        negative=s.negative, cfg_conds=CFG, cfg_cond2_negative=3.0,
                                        style="regular")[0],
    "PerpNegGuider": lambda g, s: g.add("PerpNegGuider", model=s.model, positive=s.positive, negative=s.negative,
                                        empty_conditioning=_empty_prompt(g, s), cfg=CFG, neg_scale=1.0)[0],
}

PATCHES = {
    "FreeU": ("FreeU", {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}),
    "FreeU_V2": ("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}),
    "PAG": ("PerturbedAttentionGuidance", {"scale": 3.0}),
    "SAG": ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}),
    # tile 64 px = 8 latent px: the 16x16 first level's self-attention runs on 2x2 tiles
    "HyperTile": ("HyperTile", {"tile_size": 64, "swap_size": 2, "max_depth": 0, "scale_depth": False}),
    "ToMe": ("TomePatchModel", {"ratio": 0.3}),
    "DeepShrink": ("PatchModelAddDownscale", {"block_number": 3, "downscale_factor": 2.0, "start_percent": 0.0,
                                              "end_percent": 0.35, "downscale_after_skip": True,
                                              "downscale_method": "bicubic", "upscale_method": "bicubic"}),
    "RescaleCFG": ("RescaleCFG", {"multiplier": 0.7}),
    "v_prediction": ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}),
    "lcm": ("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}),
    "CFGZeroStar": ("CFGZeroStar", {}),
    "LoRA": ("LoraLoaderModelOnly", {"lora_name": LORA_NAME, "strength_model": 1.0}),
}

CASES = {
    **{f"patch-{name}": Case(patches=(patch,)) for name, patch in PATCHES.items()},
    "patch-FreeU+PAG+DeepShrink": Case(patches=(PATCHES["FreeU"], PATCHES["PAG"], PATCHES["DeepShrink"])),
    **{f"guider-{name}": Case(guider=name) for name in GUIDERS},
    **{f"cond-{name}": Case(conditioning=name) for name in CONDITIONINGS if name != "subject"},
    **{f"latent-{name}": Case(latent=name) for name in LATENTS if name != "empty"},
    "latent-batch2": Case(batch=2),
    "latent-non_square_256x192": Case(width=256, height=192),
}


# ---------------------------------------------------------------- running the cases once

@pytest.fixture(scope="module", autouse=True)
def lora_file(tmp_path_factory, sd15):
    """A small random LoRA for the tiny SD1.5 (every cross-attention key/value and self-attention query,
    rank 4), in a temporary folder registered as a ComfyUI 'loras' folder for this module."""
    import comfy.lora
    import folder_paths
    import safetensors.torch
    folder = tmp_path_factory.mktemp("loras")
    generator = torch.Generator().manual_seed(7)
    state = {}
    for key, weight in sd15[0].model.state_dict().items():
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight", "attn1.to_q.weight")):
            out_features, in_features = weight.shape
            base = key[:-len(".weight")]
            state[f"{base}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.2
            state[f"{base}.lora_down.weight"] = torch.randn(4, in_features, generator=generator) / in_features ** 0.5
    known = comfy.lora.model_lora_keys_unet(sd15[0].model, {})
    assert state and all(key.rsplit(".lora_", 1)[0] in known for key in state)  # every key patches a weight
    safetensors.torch.save_file(state, str(folder / LORA_NAME))
    folder_paths.add_model_folder_path("loras", str(folder))
    yield
    folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture(scope="module")
def results(runner):
    """case id -> {'guided': outputs or the exception, 'check': ...}; each prompt runs once per module."""
    cache: dict = {}

    def get(case_id: str) -> dict:
        if case_id not in cache:
            case = CASES[case_id]
            cache[case_id] = {}
            for name, build in (("guided", guided_prompt), ("check", check_prompt)):
                try:
                    cache[case_id][name] = runner.run(build(case))
                except (WorkflowError, AssertionError) as error:
                    cache[case_id][name] = error
        return cache[case_id]

    return get


def _outputs(results, case_id: str, name: str) -> dict:
    out = results(case_id)[name]
    if isinstance(out, Exception):
        message = out.message if isinstance(out, WorkflowError) else str(out)
        pytest.fail(f"the {name} prompt failed: {type(out).__name__}: {message}", pytrace=False)
    return out


def _latent(out: dict, label: str) -> torch.Tensor:
    return out[label]["samples"]


parametrize_cases = pytest.mark.parametrize("case_id", list(CASES))


# ---------------------------------------------------------------- the four checks

@parametrize_cases
def test_runs_and_is_finite(results, case_id):
    guided, check = _outputs(results, case_id, "guided"), _outputs(results, case_id, "check")
    for out, label in ((guided, "guided"), (check, "unguided"), (check, "plain")):
        assert torch.isfinite(_latent(out, label)).all(), f"{label} latent is not finite"
    for out, label in ((guided, "guided_attention"), (check, "unguided_attention")):
        record = out[label]
        assert record.maps, f"{label}: no maps recorded"
        assert all(torch.isfinite(m).all() for m in record.maps), f"{label}: maps are not finite"
    assert guided["guided_attention"].losses, "the guided run recorded no loss"


@parametrize_cases
def test_guidance_acts(results, case_id):
    guided = _latent(_outputs(results, case_id, "guided"), "guided")
    plain = _latent(_outputs(results, case_id, "check"), "plain")
    assert guided.shape == plain.shape
    assert not torch.equal(guided, plain), "the guided latent equals the unguided one"


@parametrize_cases
def test_unguided_equals_plain_sampler(results, case_id):
    check = _outputs(results, case_id, "check")
    unguided, plain = _latent(check, "unguided"), _latent(check, "plain")
    assert torch.equal(unguided, plain), \
        f"capture-only latent differs from the plain sampler's (max abs {(unguided - plain).abs().max():.3g})"
    record = check["unguided_attention"]
    assert not record.losses, "without GUIDANCE the sampler must only record maps"
    assert record.steps[:1] == [0], f"no step-0 maps recorded (recorded steps: {record.steps})"


@parametrize_cases
def test_step0_maps_are_the_subject_prompts(results, case_id):
    check = _outputs(results, case_id, "check")
    record = check["unguided_attention"]
    reference = check.get("reference_attention", record)
    assert record.steps[:1] == [0], f"no step-0 maps recorded (recorded steps: {record.steps})"
    assert reference.steps[:1] == [0], f"the reference run recorded no step-0 maps ({reference.steps})"
    ours, theirs = record.subject_maps(0), reference.subject_maps(0)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, **MAP_TOLERANCE), \
        f"step-0 subject maps differ from the subject prompt's (max abs {(ours - theirs).abs().max():.3g})"


# ---------------------------------------------------------------- wiring mistakes

@pytest.mark.parametrize("guided", [False, True], ids=["capture_only", "guided"])
def test_subjects_of_another_encode_are_a_clear_error(runner, guided):
    """SUBJECTS from the negative's Attention Text Encode, not the positive's."""
    g = Graph()
    setup = Setup(g, Case())
    negative = g.add("AttnGuideTextEncode", clip=setup.clip, text="a blurry photo of a dog", subjects="dog")
    setup.negative = negative[0]
    latent, _attention = setup.ksampler(g, subjects=negative[1], guidance=guidance_node(g) if guided else None)
    g.capture("latent", latent)
    with pytest.raises(WorkflowError) as error:
        runner.run(g)
    message = error.value.message.lower()
    assert "subject" in message and "positive" in message, error.value.message


def test_guided_range_without_a_step_is_reported(runner, caplog):
    """guidance_end 0.05 of 6 steps rounds to no guided step: say so (warning or error), do not guide silently."""
    g = Graph()
    setup = Setup(g, Case(steps=6))
    latent, _attention = setup.ksampler(g, guidance=guidance_node(g, guidance_end=0.05, refinement=""))
    g.capture("latent", latent)
    g.capture("plain", setup.ksampler(g, plain=True)[0])
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        try:
            out = runner.run(g)
        except WorkflowError as error:  # an error is acceptable too, if it says why
            assert "guided" in error.message.lower(), error.message
            return
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    said += [str(w.message) for w in python_warnings]
    assert any("guided" in text.lower() for text in said), f"no warning that nothing is guided; logged: {said}"
    assert torch.equal(_latent(out, "latent"), _latent(out, "plain"))


# ---------------------------------------------------------------- every sampler: zero-size steps change nothing

@pytest.mark.parametrize("sampler", comfy.samplers.SAMPLER_NAMES)
def test_zero_scale_guidance_equals_ksampler(runner, sampler):
    """The guided passes run (scale_factor 0 never moves the latent): the latent is KSampler's, bit for bit."""
    g = Graph()
    setup = Setup(g, Case(sampler=sampler, steps=5))
    latent, attention = setup.ksampler(g, guidance=guidance_node(g, scale_factor=0.0))
    g.capture("guided", latent)
    g.capture("attention", attention)
    g.capture("plain", setup.ksampler(g, plain=True)[0])
    out = runner.run(g)
    guided, plain = _latent(out, "guided"), _latent(out, "plain")
    assert torch.equal(guided, plain), f"max abs difference {(guided - plain).abs().max():.3g}"
    record = out["attention"]
    assert record.losses, "the guided passes did not run"
    if sampler == "dpm_adaptive":
        assert record.maps, "dpm_adaptive: no maps recorded"


@parametrize_cases
def test_recorded_maps_sum_to_one_over_tokens(results, case_id):
    """AttentionRecord's contract: maps[i] are softmax probabilities, each pixel sums to 1 over the tokens
    (with ConditioningConcat the subjects' text holds a share of a softmax over both texts)."""
    record = _outputs(results, case_id, "check")["unguided_attention"]
    assert record.maps, "no maps recorded"
    sums = record.maps[0].sum(-1)
    if "concat" in case_id:
        assert bool((sums > 0.05).all() and (sums < 0.95).all()), f"{sums.min():.4f}..{sums.max():.4f}"
        return
    assert torch.allclose(sums, torch.ones(()), atol=1e-4), \
        f"step-0 maps {tuple(record.maps[0].shape)} sum to {sums.min():.4f}..{sums.max():.4f} over the tokens"
