"""The guided pass's memory mechanics (issue 6): no weight copies, feed-forward recomputation, and the
gradient they give equals the plain full-pass gradient."""
import collections
import dataclasses

import comfy.ldm.modules.attention as host_attention
import comfy.sample
import comfy.samplers
import nodes
import pytest
import torch
from harness import pack_module

sampler_mod = pack_module("guidance.sampler")
differentiable = pack_module("guidance.differentiable")
subjects_mod = pack_module("text.subjects")
tiny = pack_module("runner.tiny_models")
GuidanceConfig = sampler_mod.GuidanceConfig

TEXT = "a cat and a frog"
CONFIG = GuidanceConfig(refinement=(), guidance_end=0.25)


def _gradient(_run, x, total, _sigma):
    return torch.autograd.grad(total.sum(), [x], retain_graph=True)[0]


def _first_step(model, clip, config=CONFIG, inspect=_gradient, conds=None):
    """inspect(run, x, total, sigma) at the first guided update (default: dL/dx), through the pack's guided sampler run
    inside inference_mode as ComfyUI's executor runs it. conds: (positive, negative), default the encoded TEXT
    and an empty negative."""
    seen = []
    original = sampler_mod.GuidanceRun.update

    def update(self, x, total, sigma, step_size, active=None):
        if not seen:
            seen.append(inspect(self, x, total, sigma))
        return original(self, x, total, sigma, step_size, active)

    if conds is None:
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    else:
        positive, negative = conds
    subjects = subjects_mod.resolve_subjects(clip.tokenizer, TEXT, "cat, frog")
    sampler = sampler_mod.AttentionSampler(comfy.samplers.sampler_object("euler"), subjects, config)
    sigmas = comfy.samplers.KSampler(model, steps=4, device=model.load_device, sampler="euler", scheduler="normal",
                                     denoise=1.0, model_options=model.model_options).sigmas
    samples = torch.zeros(1, 4, 32, 32)
    noise = comfy.sample.prepare_noise(samples, 3)
    sampler_mod.GuidanceRun.update = update
    try:
        with torch.inference_mode():
            comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, positive, negative, samples,
                                       disable_pbar=True, seed=3)
    finally:
        sampler_mod.GuidanceRun.update = original
    return seen[0]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_inference_weights_are_used_without_copies(families, family, monkeypatch):
    """ComfyUI's loaders make weights inference tensors. The guided pass must not copy them (copying the linear
    and conv weights doubled its memory); the gradient must equal the one with ordinary weights."""
    _model, clip = families[family]
    with torch.inference_mode():
        loaded = tiny.make_model(family, seed=5)
    ordinary = tiny.make_model(family, seed=5)
    parameters = list(loaded.model.diffusion_model.parameters())
    assert all(p.is_inference() for p in parameters) and not any(p.is_inference()
                                                                   for p in ordinary.model.diffusion_model.parameters())
    copied, swapped = [], []
    original_swap = differentiable.GuidedPassMode._swap

    def swap(self, value):
        out = original_swap(self, value)
        swapped.append(value)
        if isinstance(value, torch.Tensor) and out is not value:
            copied.append(value)
        return out

    monkeypatch.setattr(differentiable.GuidedPassMode, "_swap", swap)
    g_loaded = _first_step(loaded, clip)
    assert swapped, "no recorded op reached the copy step: the spy sees nothing"
    # no weight is copied: linear, conv and the norms use them as they are
    assert not [tuple(t.shape) for t in copied], "inference tensors copied for the guided pass"
    monkeypatch.setattr(differentiable.GuidedPassMode, "_swap", original_swap)
    g_ordinary = _first_step(ordinary, clip)
    assert g_ordinary.abs().max() > 0
    assert _rel(g_loaded, g_ordinary) < 1e-6


def test_feedforward_recompute_gives_the_same_gradient(families, monkeypatch):
    """With recompute_feedforward the feed-forwards of the guided pass run again in each backward, the gradient is
    unchanged, and the model has no instance-level patch afterwards. A UNet's default (None: the family's choice,
    attention_patch.unet) recomputes them."""
    model, clip = families["sdxl"]
    calls = collections.Counter()
    original_forward = host_attention.FeedForward.forward

    def counting(self, x):
        calls["grad" if x.requires_grad else "plain"] += 1
        return original_forward(self, x)

    monkeypatch.setattr(host_attention.FeedForward, "forward", counting)
    recomputed = _first_step(model, clip, dataclasses.replace(CONFIG, recompute_feedforward=True))
    with_recompute = calls["grad"]
    calls.clear()
    stored = _first_step(model, clip, dataclasses.replace(CONFIG, recompute_feedforward=False))
    assert stored.abs().max() > 0
    assert _rel(recomputed, stored) < 1e-6
    # the forward, then one recomputation per backward: the test's own dL/dx and the update's
    assert calls["grad"] > 0 and with_recompute == 3 * calls["grad"]
    calls.clear()
    assert CONFIG.recompute_feedforward is None
    by_default = _first_step(model, clip, CONFIG)
    assert calls["grad"] == with_recompute and _rel(by_default, stored) < 1e-6
    feedforwards = [m for m in model.model.diffusion_model.modules() if isinstance(m, host_attention.FeedForward)]
    assert feedforwards and not any("forward" in m.__dict__ for m in feedforwards)


def _saved_bytes(model, clip, config):
    """Bytes autograd keeps for the backward of one guided pass (tensors of the model's weights excluded)."""
    return saved_bytes_of(model, lambda: _first_step(model, clip, config))[1]


def saved_bytes_of(model, run):
    """(run()'s result, the bytes autograd kept for the backward of the guided passes it made; weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.model.diffusion_model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    original_loss = sampler_mod.GuidanceRun.loss

    def loss(self, x, sigma):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return original_loss(self, x, sigma)

    sampler_mod.GuidanceRun.loss = loss
    try:
        result = run()
    finally:
        sampler_mod.GuidanceRun.loss = original_loss
    return result, sum(seen.values())


def test_truncation_and_recompute_keep_less_for_the_backward(families):
    """The truncated pass keeps less than the full pass, recomputation less again (tiny SDXL: its captured
    level is the deepest, so truncation alone saves least there)."""
    model, clip = families["sdxl"]
    full = _saved_bytes(model, clip, dataclasses.replace(CONFIG, truncate_pass=False, recompute_feedforward=False))
    stored = _saved_bytes(model, clip, dataclasses.replace(CONFIG, recompute_feedforward=False))
    default = _saved_bytes(model, clip, CONFIG)
    assert default < 0.8 * stored < 0.8 * full


def test_recompute_context_restores_the_model_on_errors():
    diffusion_model = tiny.make_unet_model("sd15", seed=1).diffusion_model
    feedforwards = [m for m in diffusion_model.modules() if isinstance(m, host_attention.FeedForward)]
    theirs = feedforwards[0].forward  # an instance-level patch of someone else's is wrapped, then put back
    feedforwards[0].forward = theirs
    with pytest.raises(RuntimeError, match="inside"):
        with differentiable.recompute_feedforward(diffusion_model):
            assert all("forward" in m.__dict__ for m in feedforwards)
            assert feedforwards[0].forward is not theirs
            raise RuntimeError("inside")
    assert feedforwards[0].__dict__["forward"] is theirs
    assert not any("forward" in m.__dict__ for m in feedforwards[1:])


@pytest.mark.parametrize("norm", ["group_norm", "layer_norm"])
def test_frozen_weight_norms_give_autograds_input_gradient(norm):
    """The norms' frozen-weight path (inference-tensor affine weight referenced, not copied) against autograd on
    ordinary tensors, float64, and torch.autograd.gradcheck of the path itself."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64, generator=generator)
    shape = (8,) if norm == "group_norm" else (3,)
    weight, bias = (torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(2))

    def call(t, w, b):
        if norm == "group_norm":
            return torch.nn.functional.group_norm(t, 4, w, b, 1e-5)
        return torch.nn.functional.layer_norm(t, shape, w, b, 1e-5)
    with torch.inference_mode():
        frozen_w, frozen_b = weight.clone(), bias.clone()
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    leaf = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(call(leaf, weight, bias), [leaf], upstream)[0]
    leaf = x.clone().requires_grad_(True)
    with differentiable.GuidedPassMode():
        out = call(leaf, frozen_w, frozen_b)
    assert torch.equal(out.detach(), call(x, weight, bias))
    assert type(out.grad_fn).__name__ == "_FrozenAffineNormBackward"  # the path taken: no copy of the weight
    got = torch.autograd.grad(out, [leaf], upstream)[0]
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    frozen = getattr(differentiable, f"frozen_weight_{norm}")
    arguments = (4,) if norm == "group_norm" else (shape,)
    assert torch.autograd.gradcheck(lambda t: frozen((t, *arguments, frozen_w, frozen_b, 1e-5), {}),
                                    (x.clone().requires_grad_(True),))
