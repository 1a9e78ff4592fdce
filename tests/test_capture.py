"""Attention capture: exact maps, bit-exact sampling, chaining with other packs' attn2 replaces."""
import copy

import comfy.ldm.modules.attention as host_attention
import nodes
import pytest
import torch
from harness import pack_module

capture_mod = pack_module("attention_patch.capture")
unet_mod = pack_module("attention_patch.unet")
sampler_nodes = pack_module("nodes.sampler")
subjects_mod = pack_module("text.subjects")

LATENT = {"samples": torch.zeros(1, 4, 32, 32)}


def _encode(clip, text="a cat and a frog", subjects="cat, frog"):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens), subjects_mod.resolve_subjects(clip.tokenizer, text, subjects)


def _attention_ksampler(model, clip, sampler="euler", steps=3, latent=LATENT, seed=7, **kwargs):
    positive, subjects = _encode(clip)
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    out = sampler_nodes.AttentionKSampler.execute(model, seed, steps, 7.5, sampler, "normal", positive, negative,
                                                  latent, 1.0, subjects, kwargs.pop("attention_resolution", 0),
                                                  kwargs.pop("record_maps", True), **kwargs)
    plain = nodes.common_ksampler(model, seed, steps, 7.5, sampler, "normal", positive, negative, latent)[0]
    return out.args[0]["samples"], out.args[1], plain["samples"]


class SpyReplace:
    """Another pack's attn2 replace (IPAdapter-style): sees q/k, changes the output, must keep running."""

    def __init__(self, offset=0.0):
        self.calls = []
        self.offset = offset

    def __call__(self, q, k, v, extra_options):
        self.calls.append((q.detach().clone(), k.detach().clone(), extra_options["n_heads"],
                           list(extra_options["cond_or_uncond"]), extra_options["block"]))
        out = host_attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return out + self.offset


def _with_spy(model, spy):
    patched = model.clone()
    for layer in unet_mod.cross_attention_layers(patched.model.diffusion_model):
        block, number, index = layer.key
        patched.set_model_attn2_replace(spy, block, number, index)
    return patched


def test_maps_equal_independent_softmax_of_the_same_q_k(sd15):
    model, clip = sd15
    spy = SpyReplace()
    _, record, _ = _attention_ksampler(_with_spy(model, spy), clip, steps=1)
    # the first model evaluation's calls at the captured (1/4, 8x8) layers, in execution order
    captured = [layer for layer in unet_mod.cross_attention_layers(model.model.diffusion_model)
                if layer.downsample == 4]
    first_eval = [(q, k, heads, cond_or_uncond) for q, k, heads, cond_or_uncond, _block in spy.calls
                  if q.shape[1] == 64][:len(captured)]
    per_layer = []
    for q, k, heads, cond_or_uncond in first_eval:
        rows = slice(cond_or_uncond.index(0) * (q.shape[0] // len(cond_or_uncond)),
                     (cond_or_uncond.index(0) + 1) * (q.shape[0] // len(cond_or_uncond)))
        qd, kd = q[rows].double(), k[rows].double()
        b, n, inner = qd.shape
        d = inner // heads
        qh = qd.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        kh = kd.reshape(b, kd.shape[1], heads, d).permute(0, 2, 1, 3)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
        per_layer.append(probs)
    reference = torch.cat(per_layer, dim=1).mean(dim=1)  # uniform over every head of every layer
    assert record.maps[0].shape == reference.shape == (1, 64, 77)
    assert torch.allclose(record.maps[0].double(), reference, rtol=1e-5, atol=1e-7)
    assert torch.allclose(record.maps[0].sum(-1), torch.ones(1, 64), atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_capture_only_equals_ksampler_bit_for_bit(families, family, sampler):
    model, clip = families[family]
    latent, record, plain = _attention_ksampler(model, clip, sampler=sampler, steps=3)
    assert (latent - plain).abs().max().item() == 0.0
    assert record.steps == [0, 1, 2]
    assert all(torch.isfinite(m).all() for m in record.maps)


def test_input_model_is_not_modified(sd15):
    model, clip = sd15
    options_before = copy.deepcopy(model.model_options)
    patches_before = {k: list(v) for k, v in model.patches.items()}
    _attention_ksampler(model, clip, steps=2)
    assert model.model_options == options_before
    assert {k: list(v) for k, v in model.patches.items()} == patches_before


def test_existing_attn2_replace_still_runs_and_maps_are_recorded(sd15):
    model, clip = sd15
    spy = SpyReplace(offset=0.05)  # changes the output, so skipping it would change the latent
    patched = _with_spy(model, spy)
    latent, record, plain_with_spy = _attention_ksampler(patched, clip, steps=2)
    assert spy.calls, "the other pack's replace was not called"
    assert (latent - plain_with_spy).abs().max().item() == 0.0
    _, _, plain_without = _attention_ksampler(model, clip, steps=2)
    assert not torch.equal(latent, plain_without)
    assert len(record.maps) == 2


def test_latent_size_must_divide_into_capture_resolution(sd15):
    model, clip = sd15
    with pytest.raises(ValueError, match=r"does not divide into the capture resolution.*multiples of 32 px"):
        _attention_ksampler(model, clip, steps=1, latent={"samples": torch.zeros(1, 4, 34, 34)})


def test_attention_resolution_choices(sd15):
    model, clip = sd15
    _, record, _ = _attention_ksampler(model, clip, steps=1, attention_resolution=16)
    assert record.resolution == (16, 16)
    with pytest.raises(ValueError, match=r"attention_resolution 5 .* valid: 0 \(auto\), 32, 16, 8"):
        _attention_ksampler(model, clip, steps=1, attention_resolution=5)


def test_model_family_without_unet_cross_attention_is_refused():
    with pytest.raises(capture_mod.UnsupportedModelError, match="SD1.x, SD2.x and SDXL"):
        unet_mod.cross_attention_layers(torch.nn.Linear(2, 2))


def test_record_maps_off_records_nothing(sd15):
    model, clip = sd15
    latent, record, plain = _attention_ksampler(model, clip, steps=2, record_maps=False)
    assert record.maps == [] and torch.equal(latent, plain)
