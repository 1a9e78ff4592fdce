"""Cross-attention capture: attn2 replace patches that record the conditional branch's maps.

The patches are installed on a per-run copy of `model_options` (never on the user's MODEL) and
wrap whatever attn2 replace another pack installed there before (IPAdapter and friends), so both run.
Only the layers of the captured resolution are patched; every other layer keeps the host's attention.

Two kinds of pass read maps:
- recording passes (the sampler's own model calls): the layer output comes from the host's attention
  (or the wrapped replace), bit for bit as without us, and the probabilities are computed beside it,
  without autograd, for the conditional rows only;
- guided passes (the extra forward of the guidance, under autograd): the probabilities are computed
  once, explicitly, and the output is probs @ v, so the loss can be differentiated through them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import comfy.ldm.modules.attention as host_attention
import comfy.model_patcher
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample


class UnsupportedModelError(ValueError):
    """The model has no UNet cross-attention this pack can read."""


class TruncatedPass(Exception):
    """Raised after the last captured layer of a guided pass: the rest of the UNet is not needed."""


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


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head. q: [B, N, heads*d], k: [B, T, heads*d] -> [B, heads, N, T] (fp32)."""
    batch, pixels, inner = q.shape
    dim_head = inner // heads
    q = q.reshape(batch, pixels, heads, dim_head).transpose(1, 2).float()
    k = k.reshape(batch, k.shape[1], heads, dim_head).transpose(1, 2).float()
    return (q @ k.transpose(-1, -2) * dim_head ** -0.5).softmax(dim=-1)


def _cond_rows(extra_options: dict, batch: int, target_uuid=None) -> slice | None:
    """Rows of the batch that belong to the subjects' cond: the chunk whose uuid is `target_uuid` (ComfyUI
    batches several conds together and lists their uuids), else the first positive chunk."""
    cond_or_uncond = extra_options.get("cond_or_uncond", [0])
    uuids = extra_options.get("uuids")
    chunk = batch // max(len(cond_or_uncond), 1)
    if target_uuid is not None and uuids is not None:
        # by uuid alone: guiders order their branches as they like (DualCFGGuider puts the positive third)
        for index, uuid in enumerate(uuids):
            if uuid == target_uuid:
                return slice(index * chunk, (index + 1) * chunk)
        return None
    if 0 not in cond_or_uncond:
        return None
    start = cond_or_uncond.index(0) * chunk
    return slice(start, start + chunk)


def layer_grid(extra_options: dict, tokens: int, downsample: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(actual, nominal) spatial size of a layer that sees `tokens` image tokens.

    nominal: the UNet input's size (an area cond's crop included) at the layer's downsampling; actual: what the
    layer really sees, which patches such as Deep Shrink change (from the host's activations_shape, else the
    input's aspect ratio)."""
    height, width = (int(v) for v in extra_options.get("original_shape", [0, 0, 0, 0])[-2:])
    nominal = (-(-height // downsample), -(-width // downsample)) if height and width else None
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and int(shape[-2]) * int(shape[-1]) == tokens:
        actual = (int(shape[-2]), int(shape[-1]))
    else:
        actual = _solve_grid(tokens, height, width)
    return actual, nominal or actual


def _solve_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) with h * w = tokens closest to the input's aspect ratio (a square without one)."""
    ratio = height / width if height and width else 1.0
    best = None
    for h in range(1, tokens + 1):
        if tokens % h == 0:
            error = abs(math.log(h / (tokens // h) / ratio))
            if best is None or error < best[0]:
                best = (error, (h, tokens // h))
    return best[1]


def resize_maps(probs: torch.Tensor, actual: tuple[int, int], nominal: tuple[int, int]) -> torch.Tensor:
    """[..., h*w, T] at `actual` -> [..., H*W, T] at `nominal` (bilinear; each pixel stays a distribution)."""
    if actual == nominal:
        return probs
    lead, tokens = probs.shape[:-2], probs.shape[-1]
    grid = probs.reshape(-1, *actual, tokens).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=nominal, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(*lead, nominal[0] * nominal[1], tokens)


class AttentionCapture:
    """Collects aggregated cross-attention maps of one resolution, one model evaluation at a time.

    State lives here, not in model_options, so that ComfyUI's deep copies of model_options (which keep
    arbitrary objects by reference) all point at the one capture of the run.
    """

    def __init__(self, layers: list[CrossAttentionLayer], resolution: tuple[int, int], target_uuid=None):
        self.layers = layers
        self.resolution = resolution
        self.target_uuid = target_uuid  # the uuid of the subjects' cond (None: the first positive chunk)
        self.grid: tuple[int, int] = resolution  # size of the maps of the last evaluation
        self._downsample = {(layer.key[0], layer.key[1]): layer.downsample for layer in layers}
        self.recording = False      # record in the sampler's own passes
        self.guided = False         # inside a guided (autograd) pass
        self.truncate = False       # stop a guided pass after the last captured layer
        self._sum: torch.Tensor | None = None
        self._heads = 0
        self._guided_maps: list[torch.Tensor] = []
        self._seen = 0

    # --- evaluation bookkeeping ---
    def begin_evaluation(self) -> None:
        self._sum, self._heads, self._guided_maps, self._seen = None, 0, [], 0
        self.grid = self.resolution

    def aggregated(self) -> torch.Tensor | None:
        """Mean over every head of every captured layer: [B, H*W, T], or None if nothing was seen."""
        if self._guided_maps:
            return torch.cat(self._guided_maps, dim=1).mean(dim=1)
        if self._sum is None:
            return None
        return self._sum / self._heads

    # --- the patch ---
    def _record(self, q, k, v, extra_options, inner):
        heads = extra_options["n_heads"]
        rows = _cond_rows(extra_options, q.shape[0], self.target_uuid)
        if self.guided:
            probs = attention_probabilities(q, k, heads)
            if rows is not None:
                self._guided_maps.append(self._on_grid(probs[rows], extra_options))
            self._seen += 1
            if self.truncate and self._seen == len(self.layers):
                raise TruncatedPass()
            if inner is not None:  # another pack's replace decides the output
                return inner(q, k, v, extra_options)
            batch, tokens, _ = v.shape
            v_heads = v.reshape(batch, tokens, heads, -1).transpose(1, 2).to(probs.dtype)
            out = (probs @ v_heads).transpose(1, 2).reshape(batch, q.shape[1], -1)
            return out.to(q.dtype)
        if self.recording and rows is not None:
            with torch.no_grad():
                probs = self._on_grid(attention_probabilities(q[rows], k[rows], heads).sum(dim=1), extra_options)
            if self._sum is not None and self._sum.shape != probs.shape:
                raise RuntimeError(f"captured maps of one evaluation differ in size ({tuple(self._sum.shape)} vs "
                                   f"{tuple(probs.shape)})")
            self._sum = probs if self._sum is None else self._sum + probs
            self._heads += heads
        return _host_attention(q, k, v, extra_options, inner)

    def _on_grid(self, probs: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """The layer's maps on this evaluation's nominal grid (resized where a patch changed the layer's size)."""
        downsample = self._downsample.get(tuple(extra_options.get("block") or ()), self.layers[0].downsample)
        actual, nominal = layer_grid(extra_options, probs.shape[-2], downsample)
        self.grid = nominal
        return resize_maps(probs, actual, nominal)

    def install(self, model_options: dict) -> dict:
        """Returns a copy of model_options with the capture wrapped around each captured attn2 layer."""
        replaces = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for layer in self.layers:
            block_name, number, index = layer.key
            inner = replaces.get(layer.key, replaces.get((block_name, number)))
            model_options = comfy.model_patcher.set_model_options_patch_replace(
                model_options, _Patch(self, inner), "attn2", block_name, number, index)
        return model_options


def _host_attention(q, k, v, extra_options, inner):
    """What the layer computes without us: the wrapped replace, else the host's optimized attention."""
    if inner is not None:
        return inner(q, k, v, extra_options)
    return host_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                              attn_precision=extra_options.get("attn_precision"),
                                              transformer_options=extra_options)


class _Patch:
    """A picklable, copy-stable callable (ComfyUI deep-copies model_options dicts, not callables)."""

    def __init__(self, capture: AttentionCapture, inner):
        self.capture = capture
        self.inner = inner

    def __call__(self, q, k, v, extra_options):
        return self.capture._record(q, k, v, extra_options, self.inner)


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
