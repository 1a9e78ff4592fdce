"""The DiT families (SD3/SD3.5's MMDiT, Flux.1 and Chroma on Flux's blocks): joint attention over [text, image].

Both compute one attention over the concatenated [text tokens, image tokens] sequence, text first, through the
host's `optimized_attention`, which hands every call to `transformer_options["optimized_attention_override"]`
when one is set. The capture installs such an override on a per-run copy of `model_options`, wrapping the one
another pack set before (attention-backend packs do), and an APPLY_MODEL wrapper (a list: wrappers compose) that
tells it, per model call, how many text and image tokens the batch holds. At a captured block:
- recording passes return the host's output (or the wrapped override's) unchanged and compute beside it, without
  autograd, the image-query x text-key slice of softmax(q k^T / sqrt(d)) over ALL keys of the joint sequence;
- guided passes compute that slice differentiably (recomputed in the backward rather than stored: the full
  [image, text + image] probabilities of a 1024 px Flux block would be about 2 GB) and return the host's output,
  which autograd differentiates as any other op.

A family module gives what differs: its blocks, the default ones, the key of a call, the patch size, the tokens
it puts before the text (MMDiT's registers) and its feed-forwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

import comfy.model_management
import comfy.patcher_extension

from .capture import SUPPORTED, TruncatedPass, UnsupportedModelError, _cond_rows

WRAPPER_KEY = "attention_guidance"


@dataclass(frozen=True)
class JointBlock:
    key: tuple[str, int]  # ("joint", i) for MMDiT; ("double", i) / ("single", i) for Flux


@dataclass
class ForwardState:
    """What one model call holds (set by the APPLY_MODEL wrapper): where the text and the image sit in the joint
    sequence, the image's token grid, and how many joint attentions this call has run."""
    text: int
    image: int
    grid: tuple[int, int]
    calls: int = 0


class Family:
    name = ""

    def matches(self, diffusion_model) -> bool:
        raise NotImplementedError

    def blocks(self, diffusion_model) -> list[JointBlock]:
        raise NotImplementedError

    def default_blocks(self, blocks: list[JointBlock]) -> list[JointBlock]:
        return blocks

    def block_key(self, transformer_options: dict, call: int, blocks: list[JointBlock]) -> tuple[str, int] | None:
        return blocks[call].key if call < len(blocks) else None

    def patch_size(self, diffusion_model) -> int:
        raise NotImplementedError

    def text_prefix(self, diffusion_model) -> int:
        return 0

    def feedforwards(self, diffusion_model) -> list[torch.nn.Module]:
        return []

    # What the guided pass recomputes in its backward by default (GuidanceConfig's None), chosen by measurement
    # (benchmarks/guidance_cost.py): recomputing trades time for memory.
    recompute_feedforward = True
    recompute_attention = False


class MMDiTFamily(Family):
    """SD3 / SD3.5 (medium: MMDiT-X, large): joint blocks, no block index in transformer_options (calls are
    counted); SD3.5 medium's extra image-only self-attention has keys of image length and is not a joint call."""
    name = "sd3"
    # every joint block is read, so truncation saves nothing: the host attention's saved probabilities
    # ([heads, L, L] per block, sub-quadratic attention's backward) are most of what the pass keeps
    recompute_attention = True

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
        return isinstance(diffusion_model, MMDiT)

    def blocks(self, diffusion_model):
        return [JointBlock(("joint", i)) for i in range(len(diffusion_model.joint_blocks))]

    def patch_size(self, diffusion_model):
        size = diffusion_model.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def text_prefix(self, diffusion_model):
        return int(getattr(diffusion_model, "register_length", 0) or 0)

    def feedforwards(self, diffusion_model):
        from comfy.ldm.modules.diffusionmodules.mmdit import Mlp, SwiGLUFeedForward
        return [m for m in diffusion_model.modules() if isinstance(m, (Mlp, SwiGLUFeedForward))]


class FluxFamily(Family):
    """Flux.1 (dev, schnell) and Chroma: double-stream blocks, then single-stream blocks; ComfyUI puts
    `block_type` and `block_index` in transformer_options."""
    name = "flux"
    # the truncated pass already keeps 0.35x a full backward's memory; recomputing the double blocks'
    # feed-forwards saves 12% more of it for 25% more time, which would take a guided step above a plain one
    recompute_feedforward = False

    def matches(self, diffusion_model) -> bool:
        from comfy.ldm.flux.layers import DoubleStreamBlock
        blocks = getattr(diffusion_model, "double_blocks", None)
        return blocks is not None and len(blocks) > 0 and isinstance(blocks[0], DoubleStreamBlock) \
            and hasattr(diffusion_model, "single_blocks") and _t5_conditioned(diffusion_model)

    def blocks(self, diffusion_model):
        return [JointBlock(("double", i)) for i in range(len(diffusion_model.double_blocks))] + \
               [JointBlock(("single", i)) for i in range(len(diffusion_model.single_blocks))]

    def default_blocks(self, blocks):
        # FOCUS (2025) reads Flux's double blocks; the single blocks then need not run in the guided pass
        return [b for b in blocks if b.key[0] == "double"]

    def block_key(self, transformer_options, call, blocks):
        kind, index = transformer_options.get("block_type"), transformer_options.get("block_index")
        if kind in ("double", "single") and isinstance(index, int):
            return (kind, index)
        return super().block_key(transformer_options, call, blocks)

    def patch_size(self, diffusion_model):
        return int(getattr(diffusion_model, "patch_size", 2))

    def feedforwards(self, diffusion_model):
        from comfy.ldm.flux.layers import DoubleStreamBlock
        return [m for block in diffusion_model.modules() if isinstance(block, DoubleStreamBlock)
                for m in (block.img_mlp, block.txt_mlp)]


def _t5_conditioned(diffusion_model) -> bool:
    """Flux.1 and Chroma take T5-XXL's 4096-wide states (a tiny test model: any width); Flux.2 and the other
    models on Flux's blocks take another text encoder, whose tokens the pack cannot place."""
    params = getattr(diffusion_model, "params", None)
    return not getattr(params, "global_modulation", False)


FAMILIES = (MMDiTFamily(), FluxFamily())


def family_of(diffusion_model) -> Family | None:
    """The DiT family of a diffusion model, None for a UNet; a clear error for DiT models not covered."""
    for family in FAMILIES:
        if family.matches(diffusion_model):
            return family
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    if isinstance(diffusion_model, UNetModel):
        return None
    raise UnsupportedModelError(
        f"{type(diffusion_model).__module__}.{type(diffusion_model).__name__} is not a model family attention "
        f"guidance covers (Qwen-Image, HiDream, Lumina, WAN, Flux.2 and others are not); supported: {SUPPORTED}")


def parse_blocks(spec: str, blocks: list[JointBlock]) -> list[JointBlock]:
    """'' (default), 'all', 'double', 'single', 'joint', or indices/ranges of the model's block list ('0-9, 12')."""
    text = spec.strip().lower()
    if text == "all":
        return blocks
    if text in ("double", "single", "joint"):
        chosen = [b for b in blocks if b.key[0] == text]
        if chosen:
            return chosen
    elif text:
        indices = []
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            try:
                first, _, last = part.partition("-")
                indices.extend(range(int(first), int(last or first) + 1))
            except ValueError:
                indices = None
                break
        if indices is not None and indices and all(0 <= i < len(blocks) for i in indices):
            return [blocks[i] for i in sorted(set(indices))]
    kinds = sorted({b.key[0] for b in blocks})
    raise ValueError(f"blocks {spec!r} is not a block choice for this model, which has {len(blocks)} attention "
                     f"blocks ({', '.join(f'{sum(b.key[0] == k for b in blocks)} {k}' for k in kinds)}); valid: "
                     f"empty (the default), 'all', {', '.join(repr(k) for k in kinds)}, or indices/ranges "
                     f"0..{len(blocks) - 1} such as '0-4, 7' (in order: {', '.join(kinds)})")


def select_blocks(family: Family, diffusion_model, latent_shape, spec: str = "") -> tuple[list[JointBlock], tuple[int, int]]:
    """The captured blocks, in execution order, and the maps' grid: the model's token grid of the full latent
    (a 1024 px Flux or SD3 image: 64x64)."""
    blocks = family.blocks(diffusion_model)
    chosen = parse_blocks(spec, blocks) if spec.strip() else family.default_blocks(blocks)
    return chosen, token_grid(family, diffusion_model, latent_shape)


def token_grid(family: Family, diffusion_model, latent_shape) -> tuple[int, int]:
    patch = family.patch_size(diffusion_model)
    height, width = int(latent_shape[-2]), int(latent_shape[-1])
    return (-(-height // patch), -(-width // patch))  # the host pads the latent to the patch size


def key_probabilities(q_image: torch.Tensor, k: torch.Tensor, first: int, stop: int, chunk: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over all keys, its key columns [first, stop), summed over heads.

    q_image: [B, heads, N, d] (the image queries), k: [B, heads, L, d] (all keys) -> [B, N, stop - first] (fp32).
    The scores are computed in q and k's dtype, scaled first, as the host's attention computes them (a bf16 model's
    in bf16: on a CPU with bf16 units that matmul is 3x faster than in fp32), and the softmax in fp32.
    Query chunks bound the [heads, chunk, L] scores held at once."""
    batch, heads, pixels, dim = q_image.shape
    scale = dim ** -0.5
    k = k.to(q_image.dtype)
    step = chunk or max(1, min(pixels, (1 << 25) // max(1, heads * k.shape[2])))
    parts = []
    for start in range(0, pixels, step):
        scores = ((q_image[:, :, start:start + step] * scale) @ k.transpose(-1, -2)).float()
        parts.append(scores.softmax(dim=-1)[..., first:stop].sum(dim=1))
    return torch.cat(parts, dim=1)


def text_image_probabilities(q_image: torch.Tensor, k: torch.Tensor, text: int, chunk: int = 0) -> torch.Tensor:
    """The image queries' attention to the text keys (the text first in the joint sequence): [B, N, text]."""
    return key_probabilities(q_image, k, 0, text, chunk)


def _differentiable_probabilities(q_image, k, first, stop):
    # recomputed in the backward: stored, the [B, heads, N, L] softmax would dominate the pass's memory
    return checkpoint(key_probabilities, q_image, k, first, stop, use_reentrant=False, preserve_rng_state=False)


def _heads_first(tensor: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """[B, heads, L, d] from the layout `optimized_attention` was called with."""
    if skip_reshape:
        return tensor
    batch, length, inner = tensor.shape
    return tensor.reshape(batch, length, heads, inner // heads).transpose(1, 2)


def _recomputed_host(host, args):
    """The host attention of a guided pass, its saved tensors dropped and recomputed in the backward (it is a
    pure function of q, k, v: no in-place update, no RNG at inference)."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def body(*values):
        from ..guidance.differentiable import GuidedPassMode  # the guidance imports the capture, not back
        rebuilt = list(args)
        for i, value in zip(tensors, values):
            rebuilt[i] = value
        # recomputed in the backward, outside the pass's own mode: the same mode again, as feed-forwards do
        with GuidedPassMode(protect_saved=False):
            return host(rebuilt)
    return checkpoint(body, *(args[i] for i in tensors), use_reentrant=False, preserve_rng_state=False)


def record_joint_attention(capture, func, inner, args, kwargs):
    """One call of `optimized_attention` during a captured run (the override's body)."""
    def call(values):
        return inner(func, *values, **kwargs) if inner is not None else func(*values, **kwargs)

    def host():
        if capture.guided and capture.recompute_attention and torch.is_grad_enabled():
            return _recomputed_host(call, args)
        return call(args)
    state = capture.forward
    transformer_options = kwargs.get("transformer_options") or {}
    if state is None or len(args) < 2:
        return host()
    q, k = args[0], args[1]
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    skip_reshape = bool(kwargs.get("skip_reshape", False))
    if heads is None or q.ndim != (4 if skip_reshape else 3):
        return host()
    length = q.shape[2] if skip_reshape else q.shape[1]
    if (k.shape[2] if skip_reshape else k.shape[1]) != length or length < state.text + state.image:
        return host()  # not the joint attention (MMDiT-X's image-only self-attention, other packs' extra calls)
    key = capture.family_impl.block_key(transformer_options, state.calls, capture.all_blocks)
    state.calls += 1
    if key not in capture.keys:
        return host()
    rows = _cond_rows(transformer_options, q.shape[0], capture.target_uuid)
    if capture.guided:
        if rows is not None:
            q4, k4 = _heads_first(q[rows], heads, skip_reshape), _heads_first(k[rows], heads, skip_reshape)
            q_image = q4[:, :, state.text:state.text + state.image]
            capture.add_guided_sum(_differentiable_probabilities(q_image, k4, 0, state.text), q4.shape[1])
            if capture.want_self_attention:  # InitNO's conflict score: the image queries' attention to the image
                capture.add_self_sum(_differentiable_probabilities(q_image, k4, state.text, state.text + state.image),
                                     q4.shape[1])
            capture.grid = state.grid
        if capture.count_unit():
            raise TruncatedPass()
        return host()
    if capture.recording and rows is not None:
        with torch.no_grad():
            q4, k4 = _heads_first(q[rows], heads, skip_reshape), _heads_first(k[rows], heads, skip_reshape)
            capture.add_recorded(text_image_probabilities(q4[:, :, state.text:state.text + state.image], k4,
                                                          state.text), q4.shape[1])
        capture.grid = state.grid
    return host()


class _Override:
    """optimized_attention_override: the capture around the override that was there (if any)."""

    def __init__(self, capture, inner):
        self.capture, self.inner = capture, inner

    def __call__(self, func, *args, **kwargs):
        return record_joint_attention(self.capture, func, self.inner, args, kwargs)


class _ApplyModelWrapper:
    """APPLY_MODEL wrapper: the token layout of each model call, for the override (text first, then image)."""

    def __init__(self, capture, family: Family, diffusion_model):
        self.capture, self.family = capture, family
        self.patch = family.patch_size(diffusion_model)
        self.prefix = family.text_prefix(diffusion_model)

    def __call__(self, executor, *args, **kwargs):
        x = args[0] if args else kwargs["x"]
        context = args[3] if len(args) > 3 else kwargs.get("c_crossattn")
        previous = self.capture.forward
        if context is not None:
            grid = (-(-int(x.shape[-2]) // self.patch), -(-int(x.shape[-1]) // self.patch))
            self.capture.forward = ForwardState(self.prefix + int(context.shape[1]), grid[0] * grid[1], grid)
        try:
            return executor(*args, **kwargs)
        finally:
            self.capture.forward = previous


def install(capture, model_options: dict) -> dict:
    """A copy of model_options with the override (wrapping the one there) and the APPLY_MODEL wrapper added."""
    model_options = dict(model_options)
    options = dict(model_options.get("transformer_options", {}))
    options["optimized_attention_override"] = _Override(capture, options.get("optimized_attention_override"))
    wrappers = {kind: {key: list(found) for key, found in by_key.items()}
                for kind, by_key in options.get("wrappers", {}).items()}
    options["wrappers"] = wrappers
    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                                 _ApplyModelWrapper(capture, capture.family_impl, capture.model),
                                                 options)
    model_options["transformer_options"] = options
    return model_options


@contextlib.contextmanager
def differentiable_host():
    """ComfyUI's own switch for code paths with autograd formulas (Flux's RoPE goes through a custom op without
    one otherwise): set for the guided pass, as ComfyUI's training nodes set it, and restored after."""
    if not hasattr(comfy.model_management, "in_training"):  # older hosts: RoPE is plain torch there
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous
