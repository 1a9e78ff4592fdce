"""Guided sampling on the tiny models: the losses go down, and guidance composes with the host."""
import logging

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import nodes
import pytest
import torch
from harness import pack_module

sampler_mod = pack_module("guidance.sampler")
sampler_nodes = pack_module("nodes.sampler")
subjects_mod = pack_module("text.subjects")
capture_mod = pack_module("attention_patch.capture")
unet_mod = pack_module("attention_patch.unet")
GuidanceConfig = sampler_mod.GuidanceConfig

TEXT = "a cat and a frog"
LATENT = {"samples": torch.zeros(1, 4, 32, 32)}
AE = GuidanceConfig(refinement=((0.0, 0.05),), max_refinement_steps=2)


def _conds(clip, text=TEXT, subjects="cat, frog"):
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    return positive, negative, subjects_mod.resolve_subjects(clip.tokenizer, text, subjects)


def _run(model, clip, config=AE, steps=4, sampler="euler", latent=LATENT, seed=11, positive=None, negative=None,
         callback=None, text=TEXT, subject_spec="cat, frog"):
    pos, neg, subjects = _conds(clip, text, subject_spec)
    positive = positive if positive is not None else pos
    negative = negative if negative is not None else neg
    guided = sampler_mod.AttentionSampler(comfy.samplers.sampler_object(sampler), subjects, config)
    ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler, scheduler="normal",
                                 denoise=1.0, model_options=model.model_options)
    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed)
    out = comfy.sample.sample_custom(model, noise, 7.5, guided, ks.sigmas, positive, negative, samples,
                                     callback=callback, disable_pbar=True, seed=seed)
    return out, guided.last_record


@pytest.fixture
def loss_after_update(monkeypatch):
    """Wraps GuidanceRun.update to also evaluate the loss at the updated latent (same step, same sigma)."""
    seen = []
    original = sampler_mod.GuidanceRun.update

    def update(self, x, total, sigma, step_size, active=None):
        new = original(self, x, total, sigma, step_size, active)
        after, _terms, _maps = self.loss(new.detach().requires_grad_(True), sigma)
        seen.append((total.detach().clone(), after.detach().clone()))
        return new

    monkeypatch.setattr(sampler_mod.GuidanceRun, "update", update)
    return seen


@pytest.mark.parametrize("weights", [
    {"attend_and_excite": 1.0},
    {"segregation": 1.0},
    {"segregation": 1.0, "retention": 1.0},
    {"attend_and_excite": 1.0, "segregation": 1.0, "retention": 1.0},
    {"attendance": 1.0},
], ids=lambda w: "+".join(w))
def test_loss_after_update_is_lower(sd15, loss_after_update, weights):
    model, clip = sd15
    config = GuidanceConfig(loss_weights=weights, guidance_end=1.0, refinement=(), scale_factor=20.0)
    latent, record = _run(model, clip, config, steps=3)
    assert torch.isfinite(latent).all()
    assert len(loss_after_update) == 3
    for before, after in loss_after_update:
        assert (after < before).all(), (before, after)
    assert [entry.step for entry in record.losses] == [0, 1, 2]
    assert set(record.losses[-1].terms) == set(weights)


@pytest.mark.parametrize("weights", [{"divide_and_bind_binding": 1.0}, {"syngen": 1.0}, {"conform": 1.0},
                                     {"attend_and_excite": 1.0, "syngen": 1.0}], ids=lambda w: "+".join(w))
def test_binding_loss_after_update_is_lower(sd15, loss_after_update, weights):
    """The binding losses on subject groups ('red cat, blue frog'): each update lowers the loss."""
    model, clip = sd15
    # CONFORM from the second step on also contrasts with the previous step's maps, which on random weights
    # are almost the current ones: its update is then ~1e-7 of the loss at A&E's step size, below fp32's
    # resolution; ten times the step size makes it measurable
    scale = 200.0 if "conform" in weights else 20.0
    if "divide_and_bind_binding" in weights:
        # the faithful term is ~2e-6 on random weights (two near-uniform pixel softmaxes): weighted up, its change
        # is above fp32's noise
        weights = {"divide_and_bind_binding": 1000.0}
    config = GuidanceConfig(loss_weights=weights, guidance_end=1.0, refinement=(), scale_factor=scale)
    latent, record = _run(model, clip, config, steps=3, text="a red cat and a blue frog",
                          subject_spec="red cat, blue frog")
    assert torch.isfinite(latent).all() and len(loss_after_update) == 3
    for before, after in loss_after_update:
        assert (after < before).all(), (before, after)
    assert set(record.losses[-1].terms) == set(weights)


@pytest.mark.parametrize("name", list(pack_module("guidance.losses").LOSSES))
def test_every_loss_alone_guides_a_run(sd15, loss_after_update, name):
    """Each loss of LOSSES as the only weighted one (as the effect benchmark and a user with one slider up run it)
    samples to the end and moves the latent. Retention alone has nothing to keep at its first step (no previous
    masks, loss 0, no gradient): that step leaves the latent as it is, the next ones guide it. (It crashed with
    "element 0 of tensors does not require grad" before.)"""
    model, clip = sd15
    config = GuidanceConfig(loss_weights={name: 1.0}, guidance_end=1.0, refinement=(), scale_factor=20.0)
    plain, _ = _run(model, clip, GuidanceConfig(loss_weights={}, guidance_end=1.0, refinement=()), steps=3,
                    text="a red cat and a blue frog", subject_spec="red cat, blue frog")
    latent, record = _run(model, clip, config, steps=3, text="a red cat and a blue frog",
                          subject_spec="red cat, blue frog")
    assert torch.isfinite(latent).all() and [entry.step for entry in record.losses] == [0, 1, 2]
    assert set(record.losses[0].terms) == {name}
    assert (latent - plain).abs().max() > 1e-6
    first_before, first_after = loss_after_update[0]
    if name == "retention":
        assert float(first_before.abs().max()) == 0.0 and torch.equal(first_before, first_after)
        assert (loss_after_update[1][0] > 0).all()


def test_binding_loss_without_attributes_is_skipped_with_a_warning(sd15, caplog):
    model, clip = sd15
    config = GuidanceConfig(loss_weights={"attend_and_excite": 1.0, "syngen": 1.0}, refinement=())
    with caplog.at_level(logging.WARNING):
        _latent, record = _run(model, clip, config, steps=4)
    assert "binds attributes" in caplog.text and "syngen" not in record.losses[0].terms


@pytest.mark.parametrize("weights", [{"syngen": 1.0}, {"conform": 1.0, "segregation": 1.0}])
def test_every_loss_skipped_means_nothing_is_guided(sd15, caplog, weights):
    """No applicable loss (no attributes; one subject for segregation): a warning, and the plain sampler's result."""
    model, clip = sd15
    config = GuidanceConfig(loss_weights=weights, refinement=())
    with caplog.at_level(logging.WARNING):
        latent, record = _run(model, clip, config, steps=4, subject_spec="cat")
    plain, _record = _run(model, clip, GuidanceConfig(loss_weights={}), steps=4, subject_spec="cat")
    assert "nothing is guided" in caplog.text and record.losses == []
    assert torch.equal(latent, plain)


def test_refinement_iterates_and_is_recorded(sd15):
    model, clip = sd15
    config = GuidanceConfig(refinement=((0.0, 0.9),), max_refinement_steps=3, guidance_end=0.25)
    _, record = _run(model, clip, config, steps=4)
    (entry,) = record.losses
    # threshold 0.9: target loss 0.1 is out of reach on random weights: 3 updates, 2 extra forwards + the final one
    assert len(entry.refinement) == 3
    assert entry.refinement[-1][0] < entry.total[0]


def test_refinement_compares_the_attend_and_excite_loss_not_the_total(sd15, caplog):
    """Thresholds are A&E's: with other terms added, the unweighted A&E loss decides; without A&E, no refinement."""
    model, clip = sd15
    weights = {"attend_and_excite": 1.0, "segregation": 1.0}
    _, probe = _run(model, clip, GuidanceConfig(loss_weights=weights, refinement=(), guidance_end=0.25), steps=4)
    excite, total = probe.losses[0].terms["attend_and_excite"][0], probe.losses[0].total[0]
    assert total > excite + 0.05  # segregation adds enough to put a target between them
    between = 1.0 - (excite + total) / 2  # target above the A&E loss, below the total: nothing to refine
    below = 1.0 - (excite - 1e-3)         # target just below the A&E loss: refined, and one update brings
    # the A&E loss under it (the total stays far above): the forward after that update, then the final one
    for threshold, refined in ((between, 0), (below, 2)):
        config = GuidanceConfig(loss_weights=weights, refinement=((0.0, threshold),), max_refinement_steps=2,
                                guidance_end=0.25)
        _, record = _run(model, clip, config, steps=4)
        assert len(record.losses[0].refinement) == refined
        assert record.losses[0].terms["attend_and_excite"][0] == pytest.approx(excite, rel=1e-6)
    astar = GuidanceConfig(loss_weights={"segregation": 1.0, "retention": 1.0}, refinement=((0.0, 0.9),),
                           guidance_end=0.25)
    with caplog.at_level(logging.WARNING):
        _, record = _run(model, clip, astar, steps=4)
    assert record.losses[0].refinement == []
    assert any("attend_and_excite loss is off: refinement is not applied" in r.getMessage() for r in caplog.records)


def test_batch_images_are_guided_independently(sd15):
    model, clip = sd15
    batch2, record2 = _run(model, clip, AE, steps=3, latent={"samples": torch.zeros(2, 4, 32, 32)})
    batch1, record1 = _run(model, clip, AE, steps=3)
    assert ((batch2[:1] - batch1).abs().max() / batch1.abs().max()).item() < 1e-5
    assert not torch.allclose(batch2[0], batch2[1])
    assert record2.losses[0].total[0] == pytest.approx(record1.losses[0].total[0], rel=1e-5)


def test_controlnet_acts_in_guided_and_unguided_steps(sd15, tiny):
    model, clip = sd15
    control = tiny.make_controlnet()
    positive, negative, _ = _conds(clip)
    hint = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(0))
    positive_cn, negative_cn = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control, hint, 1.0, 0.0, 1.0)[:2]
    calls = []
    handle = control.control_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with_cn, record = _run(model, clip, AE, steps=4, positive=positive_cn, negative=negative_cn)
        guided_calls = len(calls)
        calls.clear()
        _run(model, clip, GuidanceConfig(loss_weights={}), steps=4, positive=positive_cn, negative=negative_cn)
        unguided_calls = len(calls)
    finally:
        handle.remove()
    without_cn, record_without = _run(model, clip, AE, steps=4)
    assert unguided_calls >= 4  # every sampler step
    assert guided_calls - unguided_calls >= 2  # plus the guided passes of steps 0 and 1
    assert not torch.allclose(with_cn, without_cn)
    assert record.losses[0].total != record_without.losses[0].total  # the control acted in the guided pass
    assert len(record.losses) == 2


def test_lora_patched_model_is_guided(sd15):
    model, clip = sd15
    lora = model.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weight = lora.model.state_dict()[key]
    lora.add_patches({key: ("diff", (torch.randn_like(weight) * 0.5,))}, strength_patch=1.0)
    patched, _ = _run(lora, clip, AE, steps=3)
    plain, _ = _run(model, clip, AE, steps=3)
    again, _ = _run(model, clip, AE, steps=3)
    assert torch.isfinite(patched).all()
    assert not torch.allclose(patched, plain)
    assert torch.equal(plain, again)  # the LoRA clone left the base model as it was


def test_ipadapter_style_replace_runs_in_guided_passes(sd15):
    model, clip = sd15
    calls = {"grad": 0}

    def replace(q, k, v, extra_options):
        if torch.is_grad_enabled():
            calls["grad"] += 1
        import comfy.ldm.modules.attention as attention
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 1.01

    patched = model.clone()
    for layer in unet_mod.cross_attention_layers(patched.model.diffusion_model):
        block, number, _index = layer.key
        patched.set_model_attn2_replace(replace, block, number)  # keyed without transformer index, as IPAdapter
    out, record = _run(patched, clip, AE, steps=3)
    assert calls["grad"] > 0
    assert torch.isfinite(out).all() and len(record.losses) == 2


def test_progress_callback_advances_through_guided_steps(sd15):
    model, clip = sd15
    steps_seen = []
    _run(model, clip, AE, steps=4, sampler="dpmpp_2m",
         callback=lambda step, x0, x, total: steps_seen.append((step, total)))
    assert steps_seen == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_cancel_during_guided_step_stops_cleanly(sd15):
    model, clip = sd15
    options_before = repr(model.model_options)

    def cancel(step, x0, x, total):
        comfy.model_management.interrupt_current_processing(True)

    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(model, clip, AE, steps=4, callback=cancel)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert repr(model.model_options) == options_before
    plain, _ = _run(model, clip, GuidanceConfig(loss_weights={}), steps=2)
    assert torch.isfinite(plain).all()


def test_non_finite_gradient_skips_the_update_and_warns_once(sd15, caplog):
    model, clip = sd15

    def poison(q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention
        out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return out * float("nan") if torch.is_grad_enabled() else out

    patched = model.clone()
    patched.set_model_attn2_replace(poison, "input", 1)  # before the captured layers
    with caplog.at_level(logging.WARNING):
        out, record = _run(patched, clip, GuidanceConfig(refinement=()), steps=4)
    plain, _ = _run(patched, clip, GuidanceConfig(loss_weights={}), steps=4)
    assert torch.isfinite(out).all()
    assert torch.equal(out, plain)  # no update was applied
    assert sum("non-finite gradient" in r.getMessage() for r in caplog.records) == 1


def test_bad_guidance_settings_are_clear_errors(sd15):
    _model, clip = sd15
    _, _, subjects = _conds(clip)
    one = subjects_mod.resolve_subjects(clip.tokenizer, TEXT, "cat")
    with pytest.raises(ValueError, match="unknown loss"):
        sampler_mod.validate_config(GuidanceConfig(loss_weights={"excite": 1.0}), subjects)
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        sampler_mod.validate_config(GuidanceConfig(guidance_start=0.5, guidance_end=1.5), subjects)
    warnings = sampler_mod.validate_config(GuidanceConfig(loss_weights={"segregation": 1.0}, refinement=()), one)
    assert "needs at least 2 subjects" in warnings[0] and "cat" in warnings[0]
    warnings = sampler_mod.validate_config(GuidanceConfig(guidance_end=0.3), subjects)
    assert warnings == ["refinement at step fraction(s) [0.4] lies outside the guided range [0.0, 0.3) and is "
                        "not applied"]
    guidance_node = pack_module("nodes.guidance").AttentionGuidance
    defaults = dict(scale_factor=20.0, guidance_start=0.0, guidance_end=0.5, refinement="", max_refinement_steps=20,
                    softmax_temperature=100.0, exclude_padding=False, smoothing_sigma=0.5, retention_threshold=0.5,
                    truncate_pass=True)
    zeros = {f"{n}_weight": 0.0 for n in pack_module("guidance.losses").LOSSES}
    with pytest.raises(ValueError, match="every loss weight is 0"):
        guidance_node.execute(**defaults, **zeros)
    with pytest.raises(ValueError, match="must be greater than guidance_start"):
        guidance_node.execute(**{**defaults, "guidance_start": 0.6}, **{**zeros, "attend_and_excite_weight": 1.0})
    with pytest.raises(ValueError, match="step_fraction:threshold"):
        guidance_node.execute(**{**defaults, "refinement": "0.2-0.5"}, **{**zeros, "attend_and_excite_weight": 1.0})


def test_single_subject_segregation_is_skipped_not_crashing(sd15, caplog):
    model, clip = sd15
    pos, neg, _ = _conds(clip)
    one = subjects_mod.resolve_subjects(clip.tokenizer, TEXT, "cat")
    config = GuidanceConfig(loss_weights={"segregation": 1.0, "attend_and_excite": 1.0}, refinement=())
    guided = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), one, config)
    ks = comfy.samplers.KSampler(model, steps=2, device=model.load_device, sampler="euler", scheduler="normal",
                                 denoise=1.0, model_options=model.model_options)
    noise = comfy.sample.prepare_noise(LATENT["samples"], 1)
    with caplog.at_level(logging.WARNING):
        comfy.sample.sample_custom(model, noise, 7.5, guided, ks.sigmas, pos, neg, LATENT["samples"], disable_pbar=True,
                                   seed=1)
    assert any("segregation" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert set(guided.last_record.losses[0].terms) == {"attend_and_excite"}


def _guided_gradient(model, clip, truncate):
    """dL/dx of the first guided step, through the pack's own guided pass."""
    grads = []
    original = sampler_mod.GuidanceRun.update

    def update(self, x, total, sigma, step_size, active=None):
        grads.append(torch.autograd.grad(total.sum(), [x], retain_graph=True)[0])
        return original(self, x, total, sigma, step_size, active)

    sampler_mod.GuidanceRun.update = update
    try:
        _run(model, clip, GuidanceConfig(truncate_pass=truncate, refinement=(), guidance_end=0.25), steps=4)
    finally:
        sampler_mod.GuidanceRun.update = original
    return grads[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_truncated_pass_gradient_equals_full_pass(families, family):
    model, clip = families[family]
    truncated = _guided_gradient(model, clip, truncate=True)
    full = _guided_gradient(model, clip, truncate=False)
    assert full.abs().max() > 0
    assert ((truncated - full).norm() / full.norm()).item() < 1e-5


def test_truncated_pass_stops_after_the_last_captured_layer(sd15):
    """The blocks after the last 1/4-resolution layer (SD1.x: output blocks 6..11) never run in a guided pass."""
    model, clip = sd15
    unet = model.model.diffusion_model
    ran = []
    # the UNet runs each block's layers itself: hook the first layer (ResBlock) of every output block
    hooks = [block[0].register_forward_hook(lambda m, i, o, n=n: ran.append((n, torch.is_grad_enabled())))
             for n, block in enumerate(unet.output_blocks)]
    try:
        _run(model, clip, GuidanceConfig(refinement=(), guidance_end=0.5), steps=2)
    finally:
        for hook in hooks:
            hook.remove()
    guided_blocks = {n for n, grad in ran if grad}
    assert guided_blocks == {0, 1, 2, 3, 4, 5}  # block 5 holds the last captured layer and stops inside it
    assert {n for n, grad in ran if not grad} == set(range(12))


def test_subject_in_second_chunk_is_guided(sd15):
    model, clip = sd15
    text = ", ".join(["a small stone"] * 20) + ", a cat and a frog"
    subjects = subjects_mod.resolve_subjects(clip.tokenizer, text, "cat, frog")
    assert {s.chunk for s in subjects.subjects} == {1}
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    guided = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, AE)
    ks = comfy.samplers.KSampler(model, steps=2, device=model.load_device, sampler="euler", scheduler="normal",
                                 denoise=1.0, model_options=model.model_options)
    noise = comfy.sample.prepare_noise(LATENT["samples"], 1)
    out = comfy.sample.sample_custom(model, noise, 7.5, guided, ks.sigmas, positive, negative, LATENT["samples"],
                                     disable_pbar=True, seed=1)
    assert torch.isfinite(out).all()
    record = guided.last_record
    assert record.maps[0].shape[-1] == 154 and 0 < record.losses[0].total[0] < 1


def test_bf16_model_is_guided_with_fp32_losses(tiny, sd15):
    _model, clip = sd15
    unet = tiny.make_unet_model("sd15", dtype=torch.bfloat16)
    assert next(unet.diffusion_model.parameters()).dtype == torch.bfloat16
    model = comfy.model_patcher.ModelPatcher(unet, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    seen = []
    original = sampler_mod.GuidanceRun.loss

    def loss(self, x, sigma):
        total, terms, maps = original(self, x, sigma)
        seen.append((total.dtype, maps.dtype))
        return total, terms, maps

    sampler_mod.GuidanceRun.loss = loss
    try:
        out, record = _run(model, clip, GuidanceConfig(refinement=()), steps=2)
    finally:
        sampler_mod.GuidanceRun.loss = original
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)
    assert torch.isfinite(out).all() and 0 < record.losses[0].total[0] < 1


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_attend_and_excite_descends_on_other_families(families, family, loss_after_update):
    """SD2 is v-prediction: the latent step uses the same c_in(sigma) mapping; the loss must still go down."""
    model, clip = families[family]
    _run(model, clip, GuidanceConfig(refinement=(), guidance_end=0.5), steps=2)
    assert loss_after_update and all((after < before).all() for before, after in loss_after_update)
