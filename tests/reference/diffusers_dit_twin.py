"""diffusers twins of the pack's tiny SD3/SD3.5 (MMDiT) and Flux models, and the text attention they compute.

- `sd3_twin` / `flux_twin`: diffusers' `SD3Transformer2DModel` / `FluxTransformer2DModel` with the
  architecture of the ComfyUI model (read from its `model_config.unet_config`) and its weights, moved
  with ComfyUI's own key maps (`comfy.utils.mmdit_to_diffusers` / `flux_to_diffusers`: diffusers key ->
  ComfyUI key, a slice of a fused qkv (or of Flux's single-block linear1), or a function of the weight:
  `swap_scale_shift` for the (shift, scale) <-> (scale, shift) modulations).
- `twin_forward`: what ComfyUI's `model.model.apply_model(x, sigma, c_crossattn=context, y=pooled,
  guidance=...)` returns, the denoised latent x - sigma * v (both families are flow models);
  `twin_velocity`: the raw network output v, what `model.model.diffusion_model(...)` returns. `latent` is
  the model-space latent x (after the latent format's process_in, as apply_model gets it). ComfyUI gives the
  MMDiT timestep = sigma * 1000 (ModelSamplingDiscreteFlow's multiplier), which is what diffusers' SD3 takes;
  Flux gets timestep = sigma (and guidance as is) and diffusers' Flux multiplies both by 1000 itself. Flux
  latents are patchified 2x2 into [B, H/2 * W/2, 64] tokens (the packing of diffusers' Flux pipeline, the
  same as ComfyUI's), with image ids (0, row, col) and text ids 0, as both sides build them.
- `record_text_attention` / `twin_text_attention`: the text attention of the image tokens in the joint
  attention, from diffusers' own q and k. A recording processor (set with `set_attn_processor`) runs
  diffusers' processor unchanged and intercepts the attention call it makes (`F.scaled_dot_product_attention`
  for SD3's `JointAttnProcessor2_0`, `dispatch_attention_fn` for `FluxAttnProcessor`), so the q and k it
  records are exactly diffusers' (projections, q/k RMS norm, Flux's RoPE, the joint concatenation, in
  the order diffusers uses: [image, text] for SD3, [text, image] for Flux; the order is checked, not
  assumed, against the block's own text key projection). Nothing of ComfyUI is involved.
"""
from __future__ import annotations

import contextlib
import math
import sys
import types
from dataclasses import dataclass, field

import torch

import comfy.utils
from reference.diffusers_twin import relative_error  # noqa: F401  (re-exported for the DiT tests)


# ---------------------------------------------------------------- models

def sd3_twin(comfy_model_patcher):
    """The diffusers SD3Transformer2DModel twin of a ComfyUI MMDiT (SD3, SD3.5, MMDiT-X), same weights (fp32, eval)."""
    from diffusers import SD3Transformer2DModel

    model = _base_model(comfy_model_patcher)
    config = model.model_config.unet_config
    depth = config["depth"]
    num_blocks = config.get("num_blocks") or depth
    context = config["context_embedder_config"]["params"]
    twin = SD3Transformer2DModel(
        sample_size=config["pos_embed_max_size"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        out_channels=config.get("out_channels") or config["in_channels"],
        num_layers=num_blocks,
        attention_head_dim=64,              # ComfyUI's MMDiT: hidden = 64 * depth, heads = depth
        num_attention_heads=depth,
        joint_attention_dim=context["in_features"],
        caption_projection_dim=context["out_features"],
        pooled_projection_dim=config["adm_in_channels"],
        pos_embed_max_size=config["pos_embed_max_size"],
        dual_attention_layers=tuple(config.get("x_block_self_attn_layers") or ()),
        qk_norm={"rms": "rms_norm", None: None}[config.get("qk_norm")],
    )
    _load_comfy_weights(twin, model.diffusion_model.state_dict(), comfy.utils.mmdit_to_diffusers(config))
    return twin.eval().requires_grad_(False)


def flux_twin(comfy_model_patcher):
    """The diffusers FluxTransformer2DModel twin of a ComfyUI Flux.1 model (dev or schnell), same weights (fp32, eval)."""
    from diffusers import FluxTransformer2DModel

    model = _base_model(comfy_model_patcher)
    config = model.model_config.unet_config
    if config.get("theta", 10000) != 10000 or config.get("mlp_ratio", 4.0) != 4.0:
        raise ValueError("diffusers' Flux fixes RoPE theta at 10000 and the MLP ratio at 4")
    patch = config["patch_size"]
    twin = FluxTransformer2DModel(
        patch_size=1,                                        # diffusers' Flux takes packed 2x2 patches
        in_channels=config["in_channels"] * patch * patch,
        out_channels=config["out_channels"] * patch * patch,
        num_layers=config["depth"],
        num_single_layers=config["depth_single_blocks"],
        attention_head_dim=config["hidden_size"] // config["num_heads"],
        num_attention_heads=config["num_heads"],
        joint_attention_dim=config["context_in_dim"],
        pooled_projection_dim=config["vec_in_dim"],
        guidance_embeds=config["guidance_embed"],
        axes_dims_rope=tuple(config["axes_dim"]),
    )
    _load_comfy_weights(twin, model.diffusion_model.state_dict(), comfy.utils.flux_to_diffusers(config))
    twin.comfy_patch_size = patch
    return twin.eval().requires_grad_(False)


def _base_model(model_or_patcher):
    return getattr(model_or_patcher, "model", model_or_patcher)


def _load_comfy_weights(twin: torch.nn.Module, source: dict, mapping: dict) -> None:
    """Loads ComfyUI weights into `twin` through a ComfyUI key map (diffusers key -> ComfyUI key, or
    (key, (dim, start, length) slice or None[, function])). Every twin weight must be found, and every
    ComfyUI weight used."""
    target = twin.state_dict()
    weights, used, missing = {}, set(), []
    for key, expected in target.items():
        spec = mapping.get(key)
        if spec is None:
            missing.append(key)
            continue
        if isinstance(spec, str):
            spec = (spec, None)
        comfy_key, piece = spec[0], spec[1]
        if comfy_key not in source:
            missing.append(f"{key} (ComfyUI {comfy_key})")
            continue
        weight = source[comfy_key]
        if piece is not None:
            weight = weight.narrow(*piece)
        if len(spec) > 2 and spec[2] is not None:
            weight = spec[2](weight)
        if weight.shape != expected.shape:
            raise ValueError(f"{key}: ComfyUI gives {tuple(weight.shape)}, diffusers expects {tuple(expected.shape)}")
        weights[key] = weight.detach().clone().float()
        used.add(comfy_key)
    if missing:
        raise ValueError(f"no ComfyUI weight for diffusers keys {missing[:5]} (+{max(0, len(missing) - 5)})")
    unused = set(source) - used
    if unused:
        raise ValueError(f"ComfyUI weights with no diffusers key: {sorted(unused)[:5]}")
    twin.load_state_dict(weights)


def _is_flux(twin) -> bool:
    return type(twin).__name__ == "FluxTransformer2DModel"


# ---------------------------------------------------------------- forward

def _flux_inputs(twin, latent: torch.Tensor, context: torch.Tensor):
    """Packed 2x2 patches [B, h*w, C*4] ((c ph pw) order, as ComfyUI and diffusers' Flux pipeline pack them)
    and the ids: image (0, row, col), text zeros."""
    p = getattr(twin, "comfy_patch_size", 2)
    b, c, height, width = latent.shape
    if height % p or width % p:
        raise ValueError(f"latent {height}x{width} is not a multiple of the {p}x{p} patch")
    h, w = height // p, width // p
    packed = latent.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
    img_ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
    txt_ids = torch.zeros(context.shape[1], 3)
    return packed, img_ids.reshape(h * w, 3), txt_ids


def _sigma_batch(sigma, batch: int) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32).flatten()
    return sigma.expand(batch) if sigma.numel() == 1 else sigma


def twin_velocity(twin, latent: torch.Tensor, sigma, context: torch.Tensor, pooled: torch.Tensor,
                  guidance=None) -> torch.Tensor:
    """The twin's raw output v at model-space latent x [B, 16, H, W] and `sigma` (float or [B]), what ComfyUI's
    `diffusion_model(x, model_sampling.timestep(sigma), context=context, y=pooled, guidance=guidance)` gives.

    context: [B, T, C] text features; pooled: [B, P]; guidance: Flux dev's distilled guidance (float or [B]),
    None for SD3 and Flux schnell.
    """
    batch = latent.shape[0]
    sigma = _sigma_batch(sigma, batch)
    latent, context, pooled = latent.float(), context.float(), pooled.float()
    with torch.no_grad():
        if not _is_flux(twin):
            return twin(hidden_states=latent, encoder_hidden_states=context, pooled_projections=pooled,
                        timestep=sigma * 1000.0, return_dict=False)[0]
        packed, img_ids, txt_ids = _flux_inputs(twin, latent, context)
        if twin.config.guidance_embeds:
            guidance = _sigma_batch(3.5 if guidance is None else guidance, batch)
        else:
            guidance = None
        out = twin(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                   img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    p = getattr(twin, "comfy_patch_size", 2)
    b, c, height, width = latent.shape
    h, w = height // p, width // p
    return out.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def twin_forward(twin, latent: torch.Tensor, sigma, context: torch.Tensor, pooled: torch.Tensor,
                 guidance=None) -> torch.Tensor:
    """What ComfyUI's `model.model.apply_model(latent, sigma, c_crossattn=context, y=pooled, guidance=guidance)`
    returns: the denoised latent x - sigma * v (flow matching, ComfyUI's CONST.calculate_denoised)."""
    velocity = twin_velocity(twin, latent, sigma, context, pooled, guidance)
    sigma = _sigma_batch(sigma, latent.shape[0]).reshape(-1, 1, 1, 1)
    return latent.float() - sigma * velocity


# ---------------------------------------------------------------- text attention from diffusers' own q and k

@dataclass
class TextAttentionRecord:
    """What one twin forward's joint attention gave, per recorded block ("double_block", i) / ("single_block", i).

    maps: [B, N_image, T_text] image-query rows, text-key columns of softmax(q k^T / sqrt(d)) over ALL keys of
          the joint sequence (text and image), averaged over heads.
    full_row_sums: [B, heads, N_image] the image rows summed over all keys (1 up to rounding).
    text_first: the order of the joint sequence diffusers used in that block (True: [text, image]).
    output: the twin's forward (twin_forward's denoised latent).
    """
    maps: dict = field(default_factory=dict)
    full_row_sums: dict = field(default_factory=dict)
    text_first: dict = field(default_factory=dict)
    output: torch.Tensor | None = None

    def mean(self, blocks=None) -> torch.Tensor:
        """[B, N_image, T_text], averaged over `blocks` (default: all recorded)."""
        blocks = list(self.maps) if blocks is None else list(blocks)
        return torch.stack([self.maps[block] for block in blocks]).mean(0)


class _Recorder:
    def __init__(self, blocks):
        self.blocks = set(blocks)
        self.text_len = 0
        self.text_first = None
        self.record = TextAttentionRecord()

    def add(self, block, query, key, value, scale, attn_mask, result, text_first: bool):
        """query, key, value, result (the attention call's output): [B, heads, L, D] of the joint sequence of
        L = T + N tokens. The probabilities are checked to give diffusers' own attention output."""
        if scale is None:
            scale = 1.0 / math.sqrt(query.shape[-1])
        logits = (query.double() @ key.double().transpose(-1, -2)) * scale
        if attn_mask is not None:
            logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(~attn_mask, -math.inf)
        probabilities = logits.softmax(dim=-1)
        mixed = probabilities @ value.double()
        error = float((mixed - result.double()).abs().max() / result.double().abs().max().clamp(min=1e-30))
        if error > 1e-4:
            raise RuntimeError(f"{block}: the recorded probabilities do not give diffusers' attention output "
                               f"(rel. error {error:.1e})")
        probabilities = probabilities.float()
        t = self.text_len
        if text_first:
            image_rows, text_columns = probabilities[:, :, t:], slice(0, t)
        else:
            image_rows, text_columns = probabilities[:, :, :-t], slice(key.shape[2] - t, key.shape[2])
        self.record.maps[block] = image_rows[..., text_columns].mean(dim=1)
        self.record.full_row_sums[block] = image_rows.sum(dim=-1)
        self.record.text_first[block] = text_first


class _FunctionalProxy(types.ModuleType):
    """torch.nn.functional with scaled_dot_product_attention replaced (set as a processor module's `F`)."""

    def __init__(self, sdpa):
        super().__init__("torch.nn.functional")
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)


@contextlib.contextmanager
def _intercept_attention(processor, on_attention):
    """While active, the attention call of `processor`'s module runs as it is and gives its inputs and output
    ([B, heads, L, D]) to `on_attention(query, key, value, scale, attn_mask, result)`."""
    module = sys.modules[type(processor).__module__]
    saved = {}
    if hasattr(module, "dispatch_attention_fn"):   # diffusers' attention dispatcher: [B, L, heads, D]
        dispatch = module.dispatch_attention_fn

        def recording_dispatch(query, key, value, attn_mask=None, *args, **kwargs):
            result = dispatch(query, key, value, attn_mask, *args, **kwargs)
            on_attention(*(t.transpose(1, 2) for t in (query, key, value)), kwargs.get("scale"), attn_mask,
                         result.transpose(1, 2))
            return result

        saved["dispatch_attention_fn"] = dispatch
        module.dispatch_attention_fn = recording_dispatch
    if getattr(module, "F", None) is torch.nn.functional:  # F.scaled_dot_product_attention: [B, heads, L, D]
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def recording_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
            result = sdpa(query, key, value, attn_mask, *args, **kwargs)
            on_attention(query, key, value, kwargs.get("scale"), attn_mask, result)
            return result

        saved["F"] = module.F
        module.F = _FunctionalProxy(recording_sdpa)
    if not saved:
        raise RuntimeError(f"{type(processor).__name__}: no attention call found to intercept in {module.__name__}")
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class RecordingAttnProcessor:
    """Runs diffusers' own processor of one joint-attention block and records its text attention (see module doc)."""

    def __init__(self, inner, recorder: _Recorder, block):
        self.inner, self.recorder, self.block = inner, recorder, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        recorder, block = self.recorder, self.block
        if block not in recorder.blocks:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        calls = []

        def on_attention(query, key, value, scale, attn_mask, result):
            calls.append(1)
            if encoder_hidden_states is not None:
                text_first = _text_first(attn, key, encoder_hidden_states)
                recorder.text_first = text_first
            elif recorder.text_first is None:
                raise RuntimeError(f"{block}: the joint order is known from the double blocks, none ran before")
            else:
                text_first = recorder.text_first
            recorder.add(block, query, key, value, scale, attn_mask, result, text_first)

        with _intercept_attention(self.inner, on_attention):
            out = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if len(calls) != 1:
            raise RuntimeError(f"{block}: expected one attention call in {type(self.inner).__name__}, saw {len(calls)}")
        return out


def _text_first(attn, key: torch.Tensor, encoder_hidden_states: torch.Tensor) -> bool:
    """Where the text keys are in the joint key sequence diffusers built ([B, heads, L, D]): the block's own
    text key projection (and q/k norm) of `encoder_hidden_states` is found at the start or at the end. Flux's
    text ids are all zero, so its RoPE leaves the text keys as they are."""
    b, heads, length, d = key.shape
    t = encoder_hidden_states.shape[1]
    text_key = attn.add_k_proj(encoder_hidden_states).view(b, t, heads, d)
    norm = getattr(attn, "norm_added_k", None)
    if norm is not None:   # an RMS norm over each head's d features: the same in either layout
        text_key = norm(text_key)
    text_key = text_key.transpose(1, 2)
    first = torch.allclose(key[:, :, :t], text_key, rtol=1e-4, atol=1e-5)
    last = torch.allclose(key[:, :, length - t:], text_key, rtol=1e-4, atol=1e-5)
    if first == last:
        raise RuntimeError("cannot tell where the text keys are in diffusers' joint sequence")
    return first


def joint_blocks(twin) -> list:
    """The joint-attention blocks of the twin, in forward order: ("double_block", i) (SD3's joint blocks, Flux's
    double-stream blocks), then ("single_block", i) (Flux's single-stream blocks)."""
    blocks = [("double_block", i) for i in range(len(twin.transformer_blocks))]
    blocks += [("single_block", i) for i in range(len(getattr(twin, "single_transformer_blocks", ())))]
    return blocks


@contextlib.contextmanager
def _recording(twin, blocks):
    recorder = _Recorder(blocks)
    original = twin.attn_processors
    processors = dict(original)
    for kind, index in joint_blocks(twin):
        name = ("transformer_blocks" if kind == "double_block" else "single_transformer_blocks")
        name = f"{name}.{index}.attn.processor"
        processors[name] = RecordingAttnProcessor(original[name], recorder, (kind, index))
    twin.set_attn_processor(processors)
    try:
        yield recorder
    finally:
        twin.set_attn_processor(dict(original))


def record_text_attention(twin, latent: torch.Tensor, sigma, context: torch.Tensor, pooled: torch.Tensor,
                          guidance=None, blocks=None) -> TextAttentionRecord:
    """One twin forward (twin_forward's inputs) that records the text attention of `blocks` (default: every
    ("double_block", i); Flux's ("single_block", i) on request, see `joint_blocks`)."""
    blocks = [block for block in joint_blocks(twin) if block[0] == "double_block"] if blocks is None else list(blocks)
    unknown = set(map(tuple, blocks)) - set(joint_blocks(twin))
    if unknown:
        raise ValueError(f"no such blocks {sorted(unknown)}; the twin has {joint_blocks(twin)}")
    with _recording(twin, [tuple(block) for block in blocks]) as recorder:
        recorder.text_len = context.shape[1]
        output = twin_forward(twin, latent, sigma, context, pooled, guidance)
    record = recorder.record
    record.output = output
    return record


def twin_text_attention(twin, latent: torch.Tensor, sigma, context: torch.Tensor, pooled: torch.Tensor,
                        guidance=None, blocks=None) -> torch.Tensor:
    """[B, N_image_tokens, T_text]: image-query x text-key attention probabilities (softmax over all keys of the
    joint sequence), averaged over heads and over `blocks` (see record_text_attention). Image tokens are in
    row-major order of the patch grid (SD3: (H/2, W/2) patches; Flux: the packed 2x2 patches)."""
    return record_text_attention(twin, latent, sigma, context, pooled, guidance, blocks).mean()

