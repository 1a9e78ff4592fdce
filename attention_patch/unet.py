"""The UNet family (SD1.x, SD2.x, SDXL): which attn2 layers exist, and attn2 replace patches that feed the capture.

The patches are installed on a per-run copy of `model_options` (never on the user's MODEL) and wrap whatever
attn2 replace another pack installed there before (IPAdapter and friends), so both run. Only the layers of the
captured resolution are patched; every other layer keeps the host's attention.

Recording passes take the layer output from the host's attention (or the wrapped replace), bit for bit as without
us, and compute the probabilities beside it without autograd; guided passes compute the probabilities once,
explicitly, and the output is probs @ v, so the loss can be differentiated through them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.ldm.modules.attention as host_attention
import comfy.model_patcher
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

from .capture import TruncatedPass, UnsupportedModelError, _cond_rows, attention_probabilities, layer_grid, resize_maps


@dataclass(frozen=True)
class CrossAttentionLayer:
    key: tuple[str, int, int]  # (block name, block number, transformer index) as ComfyUI keys attn2 patches
    downsample: int            # latent pixels per map pixel at this layer


def cross_attention_layers(diffusion_model) -> list[CrossAttentionLayer]:
    """Every attn2 layer of a ComfyUI UNet, in execution order, with its downsampling factor."""
    if not isinstance(diffusion_model, UNetModel):
        raise UnsupportedModelError(
            f"{type(diffusion_model).__name__} is not a UNet with cross-attention; attention guidance supports "
            "SD1.x, SD2.x and SDXL-family models (ComfyUI's UNetModel), not DiT/MMDiT models such as SD3 or Flux")
    layers = []
    downsample = 1

    def add(block_name, number, block):
        for module in block:
            if isinstance(module, SpatialTransformer):
                for index, transformer in enumerate(module.transformer_blocks):
                    if getattr(transformer, "attn2", None) is not None:
                        layers.append(CrossAttentionLayer((block_name, number, index), downsample))

    for number, block in enumerate(diffusion_model.input_blocks):
        if any(isinstance(m, Downsample) for m in block):
            downsample *= 2
        add("input", number, block)
    add("middle", 0, diffusion_model.middle_block)
    for number, block in enumerate(diffusion_model.output_blocks):
        add("output", number, block)
        if any(isinstance(m, Upsample) for m in block):
            downsample //= 2
    if not layers:
        raise UnsupportedModelError("the model's UNet has no cross-attention layers to read")
    return layers


def select_layers(diffusion_model, latent_shape, attention_resolution: int = 0) -> tuple[list[CrossAttentionLayer], tuple[int, int]]:
    """The attn2 layers whose maps are captured, and the map size (h, w).

    attention_resolution 0 means Attend-and-Excite's choice: the layers at 1/4 of the latent
    (16x16 for a 512 px SD1.x image, 32x32 for 1024 px SDXL), i.e. ceil(W/32) in pixels.
    """
    layers = cross_attention_layers(diffusion_model)
    height, width = int(latent_shape[-2]), int(latent_shape[-1])
    factors = sorted({layer.downsample for layer in layers})
    if attention_resolution == 0:
        factor = 4
    else:
        candidates = [f for f in factors if width % f == 0 and width // f == attention_resolution]
        if not candidates:
            valid = ", ".join(f"{width // f}" for f in factors if width % f == 0)
            raise ValueError(f"attention_resolution {attention_resolution} is not a cross-attention resolution of "
                             f"this model at a {width}x{height} latent; valid: 0 (auto), {valid}")
        factor = candidates[0]
    if factor not in factors:
        raise ValueError(f"the model has no cross-attention layers at 1/{factor} of the latent; it has them at "
                         f"1/{', 1/'.join(map(str, factors))}")
    if height % factor or width % factor:
        raise ValueError(f"latent size {width}x{height} (image {width * 8}x{height * 8} px) does not divide into the "
                         f"capture resolution (1/{factor} of the latent): use an image whose width and height are "
                         f"multiples of {factor * 8} px")
    return [layer for layer in layers if layer.downsample == factor], (height // factor, width // factor)


def record_cross_attention(capture, q, k, v, extra_options, inner):
    """One captured attn2 call: the capture's maps of the subjects' cond, and the layer's output."""
    heads = extra_options["n_heads"]
    rows = _cond_rows(extra_options, q.shape[0], capture.target_uuid)
    if capture.guided:
        probs = attention_probabilities(q, k, heads)
        if rows is not None:
            capture.add_guided(_on_grid(capture, probs[rows], extra_options))
        if capture.count_unit():
            raise TruncatedPass()
        if inner is not None:  # another pack's replace decides the output
            return inner(q, k, v, extra_options)
        batch, tokens, _ = v.shape
        v_heads = v.reshape(batch, tokens, heads, -1).transpose(1, 2).to(probs.dtype)
        out = (probs @ v_heads).transpose(1, 2).reshape(batch, q.shape[1], -1)
        return out.to(q.dtype)
    if capture.recording and rows is not None:
        with torch.no_grad():
            probs = _on_grid(capture, attention_probabilities(q[rows], k[rows], heads).sum(dim=1), extra_options)
        capture.add_recorded(probs, heads)
    return _host_attention(q, k, v, extra_options, inner)


def _on_grid(capture, probs: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """The layer's maps on this evaluation's nominal grid (resized where a patch changed the layer's size)."""
    downsample = {(layer.key[0], layer.key[1]): layer.downsample for layer in capture.layers}.get(
        tuple(extra_options.get("block") or ()), capture.layers[0].downsample)
    actual, nominal = layer_grid(extra_options, probs.shape[-2], downsample)
    capture.grid = nominal
    return resize_maps(probs, actual, nominal)


def install(capture, model_options: dict) -> dict:
    """A copy of model_options with the capture wrapped around each captured attn2 layer."""
    replaces = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in capture.layers:
        block_name, number, index = layer.key
        inner = replaces.get(layer.key, replaces.get((block_name, number)))
        model_options = comfy.model_patcher.set_model_options_patch_replace(
            model_options, _Patch(capture, inner), "attn2", block_name, number, index)
    return model_options


# What a UNet's guided pass recomputes by default (capture.recompute_defaults; DiT families set their own in
# dit.Family): its feed-forward activations are the largest stored ones and cheap to run again. Recomputing the
# host attention is a DiT mechanism (dit.py); a UNet's attention is always stored.
recompute_feedforward = True
recompute_attention = False


def feedforwards(diffusion_model) -> list[torch.nn.Module]:
    """The transformer feed-forwards, whose activations a guided pass may recompute instead of storing."""
    from comfy.ldm.modules.attention import FeedForward
    return [m for m in diffusion_model.modules() if isinstance(m, FeedForward)]


def _host_attention(q, k, v, extra_options, inner):
    """What the layer computes without us: the wrapped replace, else the host's optimized attention."""
    if inner is not None:
        return inner(q, k, v, extra_options)
    return host_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                              attn_precision=extra_options.get("attn_precision"),
                                              transformer_options=extra_options)


class _Patch:
    """A picklable, copy-stable callable (ComfyUI deep-copies model_options dicts, not callables)."""

    def __init__(self, capture, inner):
        self.capture = capture
        self.inner = inner

    def __call__(self, q, k, v, extra_options):
        return record_cross_attention(self.capture, q, k, v, extra_options, self.inner)


