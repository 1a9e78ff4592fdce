"""The guided pass on every weight format and memory mode (issue 11): weights stored in fp16/bf16/fp8 and cast per
call, LoRA applied at cast time on a partially loaded model, weights streamed through one reused cast buffer.

The gradient of the first guided step must equal the one of the same weights fully loaded in fp32, and what
autograd keeps for the backward must not grow with the weights."""
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sample
import comfy.samplers
import nodes
import pytest
import torch
from harness import pack_module, run_node
from test_guided_pass import _first_step, _rel, _saved_bytes

tiny = pack_module("runner.tiny_models")
cast_weights = pack_module("guidance.cast_weights")
sampler_mod = pack_module("guidance.sampler")

FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn,
           "fp8_e5m2": torch.float8_e5m2}


def _patcher(unet_model):
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(unet_model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def _loaded(family, storage=torch.float32, manual_cast=None, seed=5):
    """A MODEL as a loader gives it (weights are inference tensors), stored in `storage`."""
    with torch.inference_mode():
        return _patcher(tiny.make_unet_model(family, seed, storage, manual_cast))


def _reference_of(cast_model, family):
    """The same weights (the stored, rounded values) fully loaded in fp32: the gradient to equal."""
    with torch.inference_mode():
        reference = tiny.make_unet_model(family, 0, torch.float32)
        state = {k: v.float() for k, v in cast_model.model.diffusion_model.state_dict().items()}
        reference.diffusion_model.load_state_dict(state)
        return _patcher(reference)


@pytest.fixture(scope="module")
def fp32_saved(families):
    return {family: _saved_bytes(_loaded(family), families[family][1], _config())
            for family in ("sd15", "sdxl")}


def _config():
    return sampler_mod.GuidanceConfig(refinement=(), guidance_end=0.25)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_stored_low_precision_weights_cast_per_call(families, fp32_saved, family, name):
    """Manual cast (weights stored in fp16/bf16/fp8, computed in fp32): same gradient as the rounded weights
    in fp32, and the backward keeps no cast copy of them."""
    clip = families[family][1]
    model = _loaded(family, FORMATS[name], torch.float32)
    layers = cast_weights._protocol_modules(model.model.diffusion_model)
    assert layers and all(m.comfy_cast_weights for m in layers if hasattr(m, "weight"))
    gradient = _first_step(model, clip, _config())
    reference = _first_step(_reference_of(model, family), clip, _config())
    assert reference.abs().max() > 0
    assert _rel(gradient, reference) < 1e-5
    saved = _saved_bytes(model, clip, _config())
    assert saved <= 1.05 * fp32_saved[family], (saved, fp32_saved[family])


def _lora_patches(model, seed=7):
    """A weight-difference patch on every 2-D weight of the attention layers (what a LoRA adds)."""
    generator = torch.Generator().manual_seed(seed)
    patches = {}
    for key, value in model.model_state_dict().items():
        if ".attn" in key and key.endswith(".weight") and value.ndim == 2:
            patches[key] = (torch.randn(value.shape, generator=generator) * 0.05,)
    return patches


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_applied_at_cast_time_on_a_partially_loaded_model(families, fp32_saved, family, monkeypatch):
    clip = families[family][1]
    base = _loaded(family)
    full = base.clone()
    partial = base.clone()
    for patcher in (full, partial):
        assert patcher.add_patches(_lora_patches(base))
    reference = _first_step(full, clip, _config())

    # load the partial clone with almost no memory budget: every layer casts and patches its weight per call
    load = comfy.model_patcher.ModelPatcher.load

    def partial_load(self, device_to=None, lowvram_model_memory=0, *args, **kwargs):
        if self is partial:
            lowvram_model_memory, kwargs["full_load"] = 1, False
        return load(self, device_to, lowvram_model_memory, *args, **kwargs)
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", partial_load)
    seen = {}
    guide = sampler_mod.GuidanceRun.guide

    def spying_guide(self, *args, **kwargs):
        seen["functions"] = sum(bool(getattr(m, "weight_function", None))
                                for m in self.inner_model.diffusion_model.modules())
        return guide(self, *args, **kwargs)
    monkeypatch.setattr(sampler_mod.GuidanceRun, "guide", spying_guide)
    gradient = _first_step(partial, clip, _config())
    assert seen["functions"] == len(_lora_patches(base))  # the set-up is what it claims: patches at cast time
    assert _rel(gradient, reference) < 1e-5
    assert _saved_bytes(partial, clip, _config()) <= 1.05 * fp32_saved[family]


class _SharedCastBuffer:
    """Simulated weight streaming: every layer's cast weight is written into one buffer that the next layer
    overwrites, as ComfyUI's reused cast buffers are (comfy.ops.get_cast_buffer)."""

    def __init__(self, cast):
        self.cast = cast
        self.buffer = None

    def __call__(self, module, *args, **kwargs):
        result = self.cast(module, *args, **kwargs)
        weight = result[0]
        with torch.no_grad():
            if self.buffer is None or self.buffer.numel() < weight.numel() or self.buffer.dtype != weight.dtype:
                self.buffer = torch.empty(max(weight.numel(), 1 << 20), dtype=weight.dtype, device=weight.device)
            view = self.buffer[:weight.numel()].view(weight.shape)
            view.copy_(weight)
        return (view, *result[1:])


def test_streamed_weights_in_a_reused_buffer(families, fp32_saved, monkeypatch):
    """Fails when the backward reads the weight the forward was handed: by then the buffer holds another
    layer's weight (a wrong gradient) or autograd's copy of it (memory that grows with the weights)."""
    family = "sd15"
    clip = families[family][1]
    reference = _first_step(_loaded(family), clip, _config())
    model = _loaded(family)
    for module in cast_weights._protocol_modules(model.model.diffusion_model):
        module.comfy_cast_weights = True  # what ComfyUI sets on layers it streams
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", _SharedCastBuffer(comfy.ops.cast_bias_weight))
    gradient = _first_step(model, clip, _config())
    assert _rel(gradient, reference) < 1e-5
    assert _saved_bytes(model, clip, _config()) <= 1.05 * fp32_saved[family]


@pytest.mark.parametrize("name", list(FORMATS))
def test_unguided_sampling_on_cast_weights_equals_ksampler(families, name):
    clip = families["sd15"][1]
    model = _loaded("sd15", FORMATS[name], torch.float32)
    text = "a cat and a frog"
    positive, subjects = pack_module("nodes.text_encode").AttentionTextEncode.execute(clip, text, "cat, frog").args
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with torch.inference_mode():
        plain = nodes.common_ksampler(model, 3, 4, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
        ksampler = pack_module("nodes.sampler").AttentionKSampler
        out = ksampler.execute(model, 3, 4, 7.5, "euler", "normal", positive, negative, latent, 1.0, subjects, 0, True)
    assert torch.equal(out.args[0]["samples"], plain)
    assert out.args[1].maps


def test_decision_follows_the_ops_protocol():
    x = torch.zeros(2, 8)
    layer = comfy.ops.disable_weight_init.Linear(8, 4)
    layer.weight = torch.nn.Parameter(torch.zeros(4, 8), requires_grad=False)
    layer.bias = None
    assert not cast_weights.weight_made_per_call(layer, x)
    layer.weight_function = [lambda w: w]
    assert cast_weights.weight_made_per_call(layer, x)
    layer.weight_function = []
    layer.comfy_cast_weights = True
    assert cast_weights.weight_made_per_call(layer, x)
    layer.comfy_cast_weights = False
    assert cast_weights.weight_made_per_call(layer, x.half())  # stored fp32, computed in fp16


def _composed(model, clip, control, hint):
    """model + FreeU_V2 + PAG + an IPAdapter-style attn2 replace (changes the output), conds + ControlNet."""
    import comfy_extras.nodes_freelunch as freelunch
    import comfy_extras.nodes_pag as pag
    model = run_node(freelunch.FreeU_V2, model=model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]
    model = run_node(pag.PerturbedAttentionGuidance, model=model, scale=2.0)[0]

    def replace(q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention
        return attention.optimized_attention(q, k, v * 1.1, extra_options["n_heads"])
    model = model.clone()
    model.set_model_attn2_replace(replace, "middle", 0, 0)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a cat and a frog"))
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint,
                                                                        1.0, 0.0, 1.0)[:2]
    return model, (positive, negative)


def test_compositions_on_a_cast_model(families):
    """ControlNet, FreeU_V2, PAG and an IPAdapter-style replace on an fp8 model: the gradient equals the one
    of the same composition on the fp32 weights."""
    clip = families["sd15"][1]
    control = tiny.make_controlnet()
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    cast = _loaded("sd15", torch.float8_e4m3fn, torch.float32)
    with torch.inference_mode():
        composed, conds = _composed(cast, clip, control, hint)
        reference_model, reference_conds = _composed(_reference_of(cast, "sd15"), clip, control, hint)
    gradient = _first_step(composed, clip, _config(), conds=conds)
    reference = _first_step(reference_model, clip, _config(), conds=reference_conds)
    plain = _first_step(_reference_of(cast, "sd15"), clip, _config())
    assert _rel(reference, plain) > 1e-3  # the composition changes the gradient
    assert _rel(gradient, reference) < 1e-5


class _Int8Linear(comfy.ops.disable_weight_init.Linear):
    """A third-party layer on ComfyUI's ops protocol that makes its weight in its own forward (as dequantizing
    packs do): int8 values and a per-row scale, dequantized per call."""
    comfy_cast_weights = True

    def forward_comfy_cast_weights(self, input):
        weight = self.weight.to(input.dtype) * self.scale.to(input.dtype)
        bias = self.bias.to(input.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(input, weight, bias)

    @classmethod
    def quantized(cls, linear):
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scale = linear.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        layer.weight = torch.nn.Parameter((linear.weight / scale).round().to(torch.int8), requires_grad=False)
        layer.register_buffer("scale", scale.float())
        layer.bias = linear.bias
        return layer


def test_third_party_layer_that_makes_its_weight_per_call(families, fp32_saved):
    """Not known by name: covered through the protocol (comfy_cast_weights, a stored weight of another type)."""
    clip = families["sd15"][1]
    with torch.inference_mode():
        quantized = tiny.make_unet_model("sd15", 5)
        replaced = 0
        for module in list(quantized.diffusion_model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear) and name in ("to_q", "to_k", "to_v", "proj"):
                    setattr(module, name, _Int8Linear.quantized(child))
                    replaced += 1
        reference = tiny.make_unet_model("sd15", 0)
        state = {}
        for key, value in quantized.diffusion_model.state_dict().items():
            if key.endswith(".scale"):
                continue
            scale = quantized.diffusion_model.state_dict().get(key.removesuffix(".weight") + ".scale")
            state[key] = value.float() * scale if scale is not None and key.endswith(".weight") else value.float()
        reference.diffusion_model.load_state_dict(state)
    assert replaced >= 10
    gradient = _first_step(_patcher(quantized), clip, _config())
    expected = _first_step(_patcher(reference), clip, _config())
    assert _rel(gradient, expected) < 1e-5
    # what autograd keeps is what it keeps for the same model with stored fp32 weights: no dequantized weight
    extra = _saved_bytes(_patcher(quantized), clip, _config()) - _saved_bytes(_patcher(reference), clip, _config())
    dequantized = sum(m.weight.numel() * 4 for m in quantized.diffusion_model.modules() if isinstance(m, _Int8Linear))
    print(f"saved beyond the fp32 model's: {extra} bytes; dequantized weights: {dequantized} bytes")
    assert extra < 0.02 * dequantized
