"""Attention capture shared by every model family: the store that aggregates one evaluation's maps, the
probabilities, which batch rows are the subjects' cond, and the map grid.

Each family says which of its layers/blocks exist and how the capture is installed on a per-run copy of
`model_options` (never on the user's MODEL): `unet.py` (SD1.x, SD2.x, SDXL: attn2 replace patches) and `dit.py`
(SD3/SD3.5's MMDiT and Flux: the joint attention through `optimized_attention_override`);
`families.select_capture` picks the family of a diffusion model and what it captures.

Two kinds of pass read maps:
- recording passes (the sampler's own model calls): the layer output is the host's, bit for bit as without us,
  and the probabilities are computed beside it, without autograd, for the subjects' cond rows only;
- guided passes (the extra forward of the guidance, under autograd): the probabilities are differentiable, and
  the pass may stop after the last captured layer (`TruncatedPass`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class UnsupportedModelError(ValueError):
    """The model has no attention this pack can read."""


class TruncatedPass(Exception):
    """Raised after the last captured layer of a guided pass: the rest of the model is not needed."""


SUPPORTED = "SD1.x, SD2.x and SDXL (UNet), SD3/SD3.5 (MMDiT) and Flux.1 (and Chroma, on Flux's blocks)"


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


@dataclass(frozen=True)
class CaptureLayout:
    """What a run captures: the family's module (unet / dit), its captured units (layers or blocks, in execution
    order) and the maps' grid (h, w) on the full latent."""
    family: object
    units: list
    resolution: tuple[int, int]
    name: str = "unet"
    impl: object = None         # DiT: the family (dit.Family) of the model
    all_units: tuple = ()       # DiT: every block of the model, in execution order
    model: object = None        # the diffusion model


class AttentionCapture:
    """Collects the aggregated text->image attention of the captured layers, one model evaluation at a time.

    State lives here, not in model_options, so that ComfyUI's deep copies of model_options (which keep
    arbitrary objects by reference) all point at the one capture of the run.
    """

    def __init__(self, layers: list, resolution: tuple[int, int], target_uuid, family,
                 layout: CaptureLayout | None = None):
        self.layers = layers        # the captured units (UNet attn2 layers, DiT blocks), in execution order
        self.family = family        # the family's module (unet, dit): install, feedforwards
        self.family_impl = layout.impl if layout is not None else None
        self.all_blocks = list(layout.all_units) if layout is not None else []
        self.model = layout.model if layout is not None else None
        self.keys = {unit.key for unit in layers}
        self.resolution = resolution
        self.target_uuid = target_uuid  # the uuid of the subjects' cond (None: the first positive chunk)
        self.grid: tuple[int, int] = resolution  # size of the maps of the last evaluation
        self.recording = False      # record in the sampler's own passes
        self.guided = False         # inside a guided (autograd) pass
        self.truncate = False       # stop a guided pass after the last captured layer
        self.recompute_attention = False  # DiT guided passes: the host attention recomputed in the backward
        self.forward = None         # DiT: what the model call being evaluated holds (dit.ForwardState)
        self._sum: torch.Tensor | None = None
        self._heads = 0
        self._guided_maps: list[torch.Tensor] = []
        self._guided_sums: list[tuple[torch.Tensor, int]] = []
        self._seen = 0
        self.want_self_attention = False  # DiT guided passes: also the image->image attention (InitNO)
        self._self_sums: list[tuple[torch.Tensor, int]] = []

    @classmethod
    def for_layout(cls, layout: CaptureLayout, target_uuid=None) -> "AttentionCapture":
        return cls(layout.units, layout.resolution, target_uuid, layout.family, layout)

    # --- evaluation bookkeeping ---
    def begin_evaluation(self) -> None:
        self._sum, self._heads, self._guided_maps, self._guided_sums, self._seen = None, 0, [], [], 0
        self.grid = self.resolution

    def aggregated(self) -> torch.Tensor | None:
        """Mean over every head of every captured layer: [B, H*W, T], or None if nothing was seen."""
        if self._guided_maps:
            return torch.cat(self._guided_maps, dim=1).mean(dim=1)
        if self._guided_sums:
            return sum(s for s, _h in self._guided_sums) / sum(h for _s, h in self._guided_sums)
        if self._sum is None:
            return None
        return self._sum / self._heads

    # --- what the family patches report ---
    def add_guided(self, probs: torch.Tensor) -> None:
        """Differentiable per-head maps of one layer of a guided pass: [B, heads, H*W, T]."""
        self._guided_maps.append(probs)

    def add_guided_sum(self, summed: torch.Tensor, heads: int) -> None:
        """Differentiable maps of one layer of a guided pass, summed over its `heads` heads: [B, H*W, T]."""
        self._guided_sums.append((summed, heads))

    def add_self_sum(self, summed: torch.Tensor, heads: int) -> None:
        """Differentiable image->image attention of one DiT block, summed over heads: [B, N, N]."""
        self._self_sums.append((summed, heads))

    def take_self_attention(self) -> torch.Tensor | None:
        """The image->image attention of the last guided pass, mean over heads and blocks, each row re-normalised
        over the image keys (a self-attention map, as InitNO reads it on UNets): [B, N, N]; then cleared."""
        sums, self._self_sums = self._self_sums, []
        if not sums:
            return None
        mean = sum(s for s, _h in sums) / sum(h for _s, h in sums)
        return mean / mean.sum(dim=-1, keepdim=True).clamp(min=1e-12)

    def add_recorded(self, summed: torch.Tensor, heads: int) -> None:
        """Maps of one layer of a recording pass, summed over its `heads` heads: [B, H*W, T]."""
        if self._sum is not None and self._sum.shape != summed.shape:
            raise RuntimeError(f"captured maps of one evaluation differ in size ({tuple(self._sum.shape)} vs "
                               f"{tuple(summed.shape)})")
        self._sum = summed if self._sum is None else self._sum + summed
        self._heads += heads

    def count_unit(self) -> bool:
        """Counts a captured unit of a guided pass; True when the pass may stop here (the last one, truncating)."""
        self._seen += 1
        return self.truncate and self._seen == len(self.layers)

    def install(self, model_options: dict) -> dict:
        """A copy of model_options with the capture installed on the captured units (by the model's family)."""
        return self.family.install(self, model_options)

    def recompute_defaults(self) -> tuple[bool, bool]:
        """What the family's guided pass recomputes by default: (feed-forwards, host attention)."""
        family = self.family_impl if self.family_impl is not None else self.family
        return family.recompute_feedforward, family.recompute_attention

    def feedforwards(self, diffusion_model) -> list[torch.nn.Module]:
        """The feed-forward modules whose activations a guided pass may recompute instead of storing."""
        if self.family_impl is not None:
            return self.family_impl.feedforwards(diffusion_model)
        return self.family.feedforwards(diffusion_model)
