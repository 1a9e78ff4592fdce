"""Attention guidance on DiT models (SD3/SD3.5's MMDiT, Flux): the joint-attention capture, capture-only parity
with KSampler, the guided pass's gradient, every loss's step, composition and clear errors.

Tiny models from ComfyUI's own classes (runner/tiny_models.py), loaded as ComfyUI's loaders load them (weights
are inference tensors), sampled inside inference_mode as ComfyUI's executor samples."""
import comfy.sample
import comfy.samplers
import nodes
import pytest
import torch
from harness import pack_module, run_node

sampler_mod = pack_module("guidance.sampler")
capture_mod = pack_module("attention_patch.capture")
dit = pack_module("attention_patch.dit")
families = pack_module("attention_patch.families")
losses = pack_module("guidance.losses")
text_encode = pack_module("nodes.text_encode")
ksampler_node = pack_module("nodes.sampler")
tiny = pack_module("runner.tiny_models")
GuidanceConfig = sampler_mod.GuidanceConfig

TEXT = "a red cat and a blue frog"
SUBJECTS = "red cat, blue frog"
SEED = 3
STEPS = 4
LATENT = (1, 16, 16, 16)  # 128 px: an 8x8 token grid
CFG = {"flux": 1.0, "flux_schnell": 1.0, "sd3": 4.0, "sd35m": 4.0}
CLIP_OF = {"flux": "flux", "flux_schnell": "flux", "sd3": "sd3", "sd35m": "sd3"}


@pytest.fixture(scope="module")
def dit_models():
    built = {}

    def get(family):
        if family not in built:
            with torch.inference_mode():  # as ComfyUI's loaders give them: inference-tensor weights
                built[family] = tiny.make_model(family, seed=11), tiny.make_clip(CLIP_OF[family])
        return built[family]
    return get


def _encode(clip, text=TEXT, subjects=SUBJECTS):
    return text_encode.AttentionTextEncode.execute(clip, text, subjects).args


def _conds(family, clip):
    positive, subjects = _encode(clip)
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    if family == "flux":  # guidance-distilled: the guidance goes in as a cond value, as FluxGuidance sets it
        positive = run_node(comfy_extras_flux().FluxGuidance, conditioning=positive, guidance=3.5)[0]
    return positive, negative, subjects


def comfy_extras_flux():
    import comfy_extras.nodes_flux as flux_nodes
    return flux_nodes


def _noise():
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(SEED))


def _sample(model, sampler, positive, negative, cfg, steps=STEPS):
    with torch.inference_mode():  # sigmas too, as ComfyUI's KSampler makes them: inference tensors
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler="euler",
                                         scheduler="simple", denoise=1.0, model_options=model.model_options).sigmas
        return comfy.sample.sample_custom(model, _noise(), cfg, sampler, sigmas, positive, negative,
                                          torch.zeros(LATENT), disable_pbar=True, seed=SEED)


# ---------------------------------------------------------------- capture

class _Spy:
    """An optimized_attention_override another pack installed first: records every call's q/k, then runs."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        self.calls.append({"q": args[0].detach().clone(), "k": args[1].detach().clone(),
                           "heads": args[3] if len(args) > 3 else kwargs.get("heads"),
                           "skip_reshape": kwargs.get("skip_reshape", False),
                           "block": (options.get("block_type"), options.get("block_index")),
                           "cond_or_uncond": list(options.get("cond_or_uncond", []))})
        return func(*args, **kwargs)


def _heads_first(call):
    q, k = call["q"].double(), call["k"].double()
    if call["skip_reshape"]:
        return q, k
    b, length, inner = q.shape
    heads = call["heads"]
    return (q.reshape(b, length, heads, -1).transpose(1, 2), k.reshape(b, length, heads, -1).transpose(1, 2))


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35m"])
def test_captured_maps_equal_an_independent_softmax_and_a_prior_override_still_runs(dit_models, family):
    """The maps are the image-query x text-key slice of softmax(q k^T / sqrt(d)) over ALL keys, averaged over the
    heads of the captured blocks, for the positive rows; another pack's override (installed first) still runs
    for every call, and its output is the layer's (the sampled latent equals the one without the capture)."""
    model, clip = dit_models(family)
    positive, negative, subjects = _conds(family, clip)
    spy = _Spy()
    patched = model.clone()
    patched.model_options["transformer_options"] = dict(patched.model_options.get("transformer_options", {}),
                                                        optimized_attention_override=spy)
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects)
    captured = _sample(patched, sampler, positive, negative, CFG[family], steps=1)
    spied_calls = list(spy.calls)
    spy.calls.clear()
    plain = _sample(patched, comfy.samplers.sampler_object("euler"), positive, negative, CFG[family], steps=1)
    assert torch.equal(captured, plain)
    assert len(spied_calls) == len(spy.calls) > 0, "the prior override did not see every attention call"

    record = sampler.last_record
    text, image = positive[0][0].shape[1], 8 * 8
    assert record.resolution == (8, 8)
    joint, summed, heads = [], 0, 0
    for call in spied_calls:
        q, k = _heads_first(call)
        if q.shape[2] != k.shape[2] or k.shape[2] < text + image:
            assert family == "sd35m" and k.shape[2] == image  # MMDiT-X's image-only self-attention: skipped
            continue
        joint.append(call)
        # Flux's default: the double blocks (older hosts name no block: they run first, in order)
        if family == "flux":
            doubles = len(model.model.diffusion_model.double_blocks)
            if (call["block"][0] or ("double" if len(joint) <= doubles else "single")) != "double":
                continue
        row = call["cond_or_uncond"].index(0) if 0 in call["cond_or_uncond"] else None
        chunk = q.shape[0] // len(call["cond_or_uncond"])
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        assert torch.allclose(probs.sum(-1), torch.ones((), dtype=probs.dtype))
        rows = probs[row * chunk:(row + 1) * chunk, :, text:text + image, :text]
        summed, heads = summed + rows.sum(dim=1), heads + rows.shape[1]
    # Flux: 2 double + 2 single blocks (cfg 1: no negative pass); SD3: 3 joint blocks, cond and uncond batched
    assert len(joint) == {"flux": 4, "sd3": 3, "sd35m": 3}[family]
    expected = (summed / heads).float()
    got = record.maps[0]
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert float(got.sum(-1).max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_capture_only_sampling_equals_ksampler_bit_for_bit(dit_models, family):
    """Attention KSampler without GUIDANCE is KSampler (SD3 with CFG, Flux with its guidance embedding), and its
    ATTENTION holds one entry per step on the model's token grid."""
    model, clip = dit_models(family)
    positive, negative, subjects = _conds(family, clip)
    latent = {"samples": torch.zeros(LATENT)}
    common = dict(model=model, seed=SEED, steps=STEPS, cfg=CFG[family], sampler_name="euler", scheduler="simple",
                  positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    with torch.inference_mode():
        plain = nodes.KSampler().sample(**common)[0]["samples"]
        out, record = ksampler_node.AttentionKSampler.execute(subjects=subjects, attention_resolution=0,
                                                              record_maps=True, **common).args
    assert torch.equal(out["samples"], plain)
    assert record.steps == list(range(STEPS)) and record.resolution == (8, 8)
    assert all(m.shape == (1, 64, subjects.num_tokens) for m in record.maps)


def _guided_inspect(model, clip, family, config, inspect):
    """inspect(run, x, total, sigma) at the first guided update, through the pack's sampler in inference mode."""
    positive, negative, subjects = _conds(family, clip)
    seen = []
    original = sampler_mod.GuidanceRun.update

    def update(self, x, total, sigma, step_size, active=None):
        if not seen:
            seen.append(inspect(self, x, total, sigma))
        return original(self, x, total, sigma, step_size, active)

    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, config)
    sampler_mod.GuidanceRun.update = update
    try:
        _sample(model, sampler, positive, negative, CFG[family])
    finally:
        sampler_mod.GuidanceRun.update = original
    return seen[0], sampler


def _maps_functional(run, x, sigma, weights):
    """A smooth scalar of the differentiable maps (finite differences need no max or clamp); zero-mean weights
    keep the rows' near-constant sums from drowning the difference in fp32 rounding."""
    return (run.forward_maps(x, sigma).double() * weights).sum()


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("recompute", [None, True, False], ids=["family-default", "recompute", "store"])
def test_guided_gradient_equals_full_pass_and_finite_differences(dit_models, family, recompute):
    """The truncated guided pass (Flux: no single block runs), with the family's recomputation or with
    feed-forwards and host attention all recomputed or all stored, gives the gradient of the full pass with
    everything stored, and the gradient of the maps agrees with central finite differences along a random
    direction."""
    model, clip = dit_models(family)
    config = GuidanceConfig(refinement=(), guidance_end=0.25, recompute_feedforward=recompute,
                            recompute_attention=recompute)

    def inspect(run, x, total, sigma):
        truncated = torch.autograd.grad(total.sum(), [x], retain_graph=True)[0]
        chosen = run.config
        run.config = GuidanceConfig(refinement=(), guidance_end=0.25, truncate_pass=False,
                                    recompute_feedforward=False, recompute_attention=False)
        full_x = x.detach().clone().requires_grad_(True)
        full_total, _terms, _maps = run.loss(full_x, sigma)
        full = torch.autograd.grad(full_total.sum(), [full_x])[0]
        run.config = chosen
        weights = torch.rand(run.forward_maps(x.detach(), sigma).shape, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64) - 0.5
        smooth_x = x.detach().clone().requires_grad_(True)
        grad = torch.autograd.grad(_maps_functional(run, smooth_x, sigma, weights), [smooth_x])[0]
        # along the gradient mixed with a random direction: a derivative well above fp32's rounding, which a wrong
        # gradient would still miss
        direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        direction = grad / grad.norm() + 0.5 * direction / direction.norm()
        eps = 5e-2
        with torch.no_grad():
            up = _maps_functional(run, x.detach() + eps * direction, sigma, weights)
            down = _maps_functional(run, x.detach() - eps * direction, sigma, weights)
        return truncated, full, float((grad * direction).sum()), float((up - down) / (2 * eps))

    (truncated, full, analytic, numeric), _sampler = _guided_inspect(model, clip, family, config, inspect)
    assert full.abs().sum() > 0
    assert ((truncated - full).norm() / full.norm()).item() < 1e-5
    assert abs(analytic - numeric) <= 1e-3 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_recomputed_host_attention_runs_again_in_the_backward(dit_models, family):
    """With recompute_attention the host attention of the guided pass (through another pack's override, which
    still runs) is called again during the backward, once per call of the forward; stored, it is not. The
    families' defaults: SD3 recomputes it (every joint block is read), Flux does not."""
    model, clip = dit_models(family)
    spy = _Spy()
    patched = model.clone()
    patched.model_options["transformer_options"] = dict(patched.model_options.get("transformer_options", {}),
                                                        optimized_attention_override=spy)
    counts = {}

    def inspect(run, x, total, sigma):
        for recompute in (None, True, False):
            run.config = GuidanceConfig(refinement=(), guidance_end=0.25, recompute_attention=recompute)
            fresh = x.detach().clone().requires_grad_(True)
            spy.calls.clear()
            loss = run.loss(fresh, sigma)[0].sum()
            forward = len(spy.calls)
            grad = torch.autograd.grad(loss, [fresh])[0]
            counts[recompute] = (forward, len(spy.calls) - forward, grad)

    _guided_inspect(patched, clip, family, GuidanceConfig(refinement=(), guidance_end=0.25), inspect)
    forward, again, recomputed = counts[True]
    assert forward > 0 and again == forward
    assert counts[False][1] == 0 and counts[False][0] == forward
    assert counts[None][1] == (forward if family == "sd3" else 0)
    stored = counts[False][2]
    assert ((recomputed - stored).norm() / stored.norm()).item() < 1e-5


def test_flux_guided_pass_runs_no_single_block(dit_models, monkeypatch):
    """With Flux's default blocks (the double ones), the guided pass stops after the last double block: none of
    the single blocks runs under autograd; the sampler's own passes run them all."""
    import comfy.ldm.flux.layers as flux_layers
    model, clip = dit_models("flux")
    ran = {"guided": 0, "plain": 0}
    original = flux_layers.SingleStreamBlock.forward

    def forward(self, *args, **kwargs):
        ran["guided" if torch.is_grad_enabled() else "plain"] += 1
        return original(self, *args, **kwargs)
    monkeypatch.setattr(flux_layers.SingleStreamBlock, "forward", forward)
    _guided_inspect(model, clip, "flux", GuidanceConfig(refinement=(), guidance_end=0.5), lambda *a: None)
    assert ran["guided"] == 0 and ran["plain"] == STEPS * 2


BINDING = {"divide_and_bind_binding", "syngen", "conform"}


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("loss", sorted(losses.LOSSES))
def test_every_loss_is_lower_after_its_update(dit_models, family, loss):
    """One guided update x <- x - alpha dL/dx (c_in = 1 for flow models) lowers each registered loss."""
    model, clip = dit_models(family)
    weights = {loss: 1.0}
    if loss == "retention":  # needs the previous step's masks: A&E's loss gives them
        weights = {"attend_and_excite": 1.0, "retention": 1.0}
    config = GuidanceConfig(loss_weights=weights, refinement=(), guidance_end=0.5)
    original = sampler_mod.GuidanceRun.update

    def inspect(run, x, total, sigma):
        if loss == "retention" and run.previous_masks is None:
            return None
        fresh = x.detach().clone().requires_grad_(True)  # its own graph: the sampler's update still needs x's
        total, _terms, _maps = run.loss(fresh, sigma)
        before = float(total.sum())
        moved = original(run, fresh, total, sigma, 1.0)
        after, _terms, _maps = run.loss(moved.requires_grad_(True), sigma)
        return before, float(after.sum())

    seen = []

    def update(self, x, total, sigma, step_size, active=None):
        result = inspect(self, x, total, sigma) if len(seen) < 1 else None
        if result is not None:
            seen.append(result)
        return original(self, x, total, sigma, step_size, active)

    positive, negative, subjects = _conds(family, clip)
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, config)
    sampler_mod.GuidanceRun.update = update
    try:
        _sample(model, sampler, positive, negative, CFG[family])
    finally:
        sampler_mod.GuidanceRun.update = original
    assert seen, f"loss {loss} was never guided"
    before, after = seen[0]
    assert after < before, (loss, before, after)


def test_blocks_choice_and_unsupported_families_give_clear_errors(dit_models):
    model, _clip = dit_models("flux")
    diffusion_model = model.model.diffusion_model
    layout = families.select_capture(diffusion_model, LATENT, blocks="single")
    assert [u.key for u in layout.units] == [("single", 0), ("single", 1)] and layout.resolution == (8, 8)
    assert [u.key for u in families.select_capture(diffusion_model, LATENT, blocks="0, 2-3").units] == \
        [("double", 0), ("single", 0), ("single", 1)]
    with pytest.raises(ValueError, match=r"blocks '7' .* 4 attention blocks \(2 double, 2 single\).* 0\.\.3"):
        families.select_capture(diffusion_model, LATENT, blocks="7")
    unet_model = tiny.make_model("sd15")
    with pytest.raises(ValueError, match="selects DiT blocks"):
        families.select_capture(unet_model.model.diffusion_model, (1, 4, 32, 32), blocks="double")
    with pytest.raises(capture_mod.UnsupportedModelError, match=r"SD3/SD3\.5 \(MMDiT\) and Flux"):
        families.select_capture(torch.nn.Linear(2, 2), LATENT)
    # a DiT family the pack does not cover, from ComfyUI's own classes: AuraFlow's MMDiT (not SD3's)
    import comfy.ldm.aura.mmdit
    import comfy.ops
    aura = comfy.ldm.aura.mmdit.MMDiT(in_channels=4, out_channels=4, dim=64, n_layers=2, n_double_layers=1, n_heads=2,
                                      global_conddim=64, cond_seq_dim=32, max_seq=64,
                                      operations=comfy.ops.disable_weight_init)
    with pytest.raises(capture_mod.UnsupportedModelError,
                       match=r"comfy\.ldm\.aura\.mmdit\.MMDiT is not a model family .* supported: SD1\.x"):
        families.select_capture(aura, (1, 4, 16, 16))


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35m"])
def test_captured_maps_equal_diffusers_attention_on_a_twin(family):
    """On diffusers' transformer with the same weights (ComfyUI's key maps), the maps computed from diffusers'
    own attention equal the pack's capture of ComfyUI's model (every joint block; Flux: double and single)."""
    from reference.diffusers_dit_twin import flux_twin, joint_blocks, record_text_attention, sd3_twin
    model = tiny.make_model(family, seed=5)
    clip = tiny.make_clip(CLIP_OF[family])
    twin = (flux_twin if family.startswith("flux") else sd3_twin)(model)
    context, pooled = clip.encode_from_tokens(clip.tokenize(TEXT), return_pooled=True)
    latent = torch.randn(1, 16, 12, 16, generator=torch.Generator().manual_seed(7))  # 6x8 tokens: not square
    sigma = torch.tensor([0.7])
    guidance = torch.tensor([3.5]) if family == "flux" else None
    expected = record_text_attention(twin, latent, sigma, context, pooled, guidance, blocks=joint_blocks(twin)).mean(
        joint_blocks(twin))

    diffusion_model = model.model.diffusion_model
    layout = families.select_capture(diffusion_model, latent.shape, blocks="all")
    capture = capture_mod.AttentionCapture.for_layout(layout)
    options = capture.install({"transformer_options": {}})["transformer_options"]
    options["cond_or_uncond"] = [0]
    capture.recording = True
    capture.begin_evaluation()
    extra = {"guidance": guidance} if guidance is not None else {}
    with torch.no_grad():
        model.model.apply_model(latent, sigma, c_crossattn=context, y=pooled, transformer_options=options, **extra)
    got = capture.aggregated()
    assert capture.grid == (6, 8) and got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_visualiser_draws_dit_records(dit_models, family):
    """Every mode of the visualiser draws a guided DiT run's record (maps at the token grid, losses per step)."""
    visualiser = pack_module("nodes.visualiser")
    model, clip = dit_models(family)
    positive, negative, subjects = _conds(family, clip)
    config = GuidanceConfig(loss_weights={"attend_and_excite": 1.0, "segregation": 1.0, "divide_and_bind_binding": 1.0},
                            refinement=(), guidance_end=0.5)
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, config, record_maps=True)
    _sample(model, sampler, positive, negative, CFG[family])
    record = sampler.last_record
    assert [entry.step for entry in record.losses] == [0, 1]
    for mode in visualiser.MODES:
        image = visualiser.AttentionVisualize.execute(record, mode, -1, "turbo", 0.6, 0).args[0]
        assert image.ndim == 4 and image.shape[-1] == 3 and float(image.std()) > 0.01, mode


def test_lora_patched_flux_is_captured_and_guided_with_its_patch(dit_models, tmp_path):
    """A LoRA file (rank 4 on every double block's attention) loaded by ComfyUI's LoraLoaderModelOnly: capture-only
    sampling still equals KSampler on the patched model, the maps are the patched model's, and guidance runs."""
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import safetensors.torch
    model, clip = dit_models("flux")
    positive, negative, subjects = _conds("flux", clip)
    generator = torch.Generator().manual_seed(4)
    state = {}
    for key, weight in model.model.state_dict().items():
        if ".double_blocks." in key and key.endswith(("img_attn.qkv.weight", "txt_attn.qkv.weight")):
            out_features, in_features = weight.shape
            base = key[:-len(".weight")]
            state[f"{base}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.2
            state[f"{base}.lora_down.weight"] = torch.randn(4, in_features, generator=generator) / in_features ** 0.5
    known = comfy.lora.model_lora_keys_unet(model.model, {})
    assert state and all(key.rsplit(".lora_", 1)[0] in known for key in state)  # every key patches a weight
    path = tmp_path / "flux_lora.safetensors"
    safetensors.torch.save_file(state, str(path))
    patched = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0)[0]
    assert len(patched.patches) == len(state) // 2
    latent = {"samples": torch.zeros(LATENT)}
    common = dict(seed=SEED, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="simple", positive=positive,
                  negative=negative, latent_image=latent, denoise=1.0)
    records = {}
    with torch.inference_mode():
        for name, m in (("plain", model), ("lora", patched)):
            reference = nodes.KSampler().sample(model=m, **common)[0]["samples"]
            out, records[name] = ksampler_node.AttentionKSampler.execute(
                model=m, subjects=subjects, attention_resolution=0, record_maps=True, **common).args
            assert torch.equal(out["samples"], reference), name
    assert not torch.allclose(records["plain"].maps[0], records["lora"].maps[0], atol=1e-4)
    config = GuidanceConfig(refinement=(), guidance_end=0.5)
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, config)
    guided = _sample(patched, sampler, positive, negative, 1.0)
    assert torch.isfinite(guided).all() and len(sampler.last_record.losses) == 2


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_models_see_the_latent_itself(dit_models, family):
    """c_in = 1 for flow models (x_t = sigma noise + (1 - sigma) x0): the update x <- x - alpha dL/dx / c_in^2 is
    Attend-and-Excite's z-space step on a latent of unit scale."""
    model, _clip = dit_models(family)
    sigmas = torch.tensor([1.0, 0.5, 0.05])
    assert torch.equal(sampler_mod.input_scale(model.model.model_sampling, sigmas), torch.ones(3))


def test_conform_reads_the_previous_guided_steps_maps(dit_models, monkeypatch):
    """CONFORM's previous maps: none at the first guided step, then the maps of the forward that drove the
    previous update (constants)."""
    model, clip = dit_models("flux")
    positive, negative, subjects = _conds("flux", clip)
    seen = []
    original = losses.conform_loss

    def spy(maps, attribute_maps, attribute_owner, previous_token_maps=None, **kwargs):
        seen.append(None if previous_token_maps is None else
                    (previous_token_maps[0].requires_grad, previous_token_maps[0].shape == maps.shape))
        return original(maps, attribute_maps, attribute_owner, previous_token_maps=previous_token_maps, **kwargs)
    monkeypatch.setitem(losses.LOSSES, "conform", losses.LOSSES["conform"].__class__(
        spy, **{k: v for k, v in vars(losses.LOSSES["conform"]).items() if k != "function"}))
    config = GuidanceConfig(loss_weights={"conform": 1.0}, refinement=(), guidance_end=0.75)
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, config)
    _sample(model, sampler, positive, negative, 1.0)
    assert seen == [None, (False, True), (False, True)]


def _dit_loaded(family, storage=torch.float32, manual_cast=None, seed=5):
    """A DiT MODEL as a loader gives it (inference-tensor weights) stored in `storage`."""
    import comfy.model_management
    import comfy.model_patcher
    with torch.inference_mode():
        model = tiny.make_unet_model(family, seed, storage, manual_cast)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _gradient_and_saved(model, clip, family):
    """dL/dx at the first guided update, and the bytes autograd kept for that pass's backward (weights excluded)."""
    from test_guided_pass import saved_bytes_of
    config = GuidanceConfig(refinement=(), guidance_end=0.25)
    (gradient, _sampler), saved = saved_bytes_of(model, lambda: _guided_inspect(
        model, clip, family, config, lambda run, x, total, sigma: torch.autograd.grad(total.sum(), [x],
                                                                                     retain_graph=True)[0]))
    return gradient, saved


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float8_e4m3fn])
def test_dit_weights_stored_low_precision_cast_per_call(dit_models, family, storage):
    """Flux and SD3 as users load them (bf16, fp8 storage, computed in fp32 by ComfyUI's manual cast): the guided
    gradient equals the one of the same rounded weights fully loaded in fp32, and the backward keeps no cast
    copy of the weights (within 5% of the fp32 model's saved bytes)."""
    _model, clip = dit_models(family)
    cast = _dit_loaded(family, storage, torch.float32)
    with torch.inference_mode():
        reference_model = tiny.make_unet_model(family, 0, torch.float32)
        reference_model.diffusion_model.load_state_dict(
            {k: v.float() for k, v in cast.model.diffusion_model.state_dict().items()})
    import comfy.model_management
    import comfy.model_patcher
    reference = comfy.model_patcher.ModelPatcher(reference_model, load_device=comfy.model_management.get_torch_device(),
                                                 offload_device=comfy.model_management.unet_offload_device())
    got, saved = _gradient_and_saved(cast, clip, family)
    want, saved_fp32 = _gradient_and_saved(reference, clip, family)
    assert want.abs().max() > 0
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert saved <= 1.05 * saved_fp32, (saved, saved_fp32)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_initno_on_dit_models(dit_models, family, monkeypatch):
    """InitNO on DiT models: its conflict score reads the image->image part of the captured blocks' joint
    attention (each row re-normalised over the image keys); the stage lowers its score, keeps the noise a
    standard normal draw, and sampling starts from that noise."""
    initno_mod = pack_module("guidance.initno")
    model, clip = dit_models(family)
    positive, negative, subjects = _conds(family, clip)
    self_maps = []
    original_conflict = initno_mod.conflict_score

    def conflict(maps_self, maps, smoothing_sigma=0.5):
        self_maps.append(maps_self.detach())
        return original_conflict(maps_self, maps, smoothing_sigma)
    monkeypatch.setattr(initno_mod, "conflict_score", conflict)
    config = initno_mod.InitNOConfig(rounds=2, iterations=4, final_iterations=2, learning_rate=0.05)
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, initno=config)
    out = _sample(model, sampler, positive, negative, CFG[family])
    plain = _sample(model, comfy.samplers.sampler_object("euler"), positive, negative, CFG[family])
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert self_maps and self_maps[0].shape == (1, 64, 64)  # [B, N, N] on the 8x8 token grid
    assert torch.allclose(self_maps[0].sum(-1), torch.ones(1, 64), atol=1e-5)
    history = sampler.last_record.initno["history"]
    first_round = [entry for entry in history if entry[0] == 0]
    joint = [initno_mod.joint_score(torch.tensor(r), torch.tensor(c)).item() for _round, _i, r, c in first_round]
    assert joint[-1] < joint[0]
    assert 0.0 <= sampler.last_record.initno["kl"][0] <= config.kl_bound
