"""The world model: a narrow SD1.x text-to-image model built from ComfyUI's own classes, its fixed VAE, and its
single-file checkpoint.

- UNet: ComfyUI's `UNetModel` in SD1.x form (`comfy.supported_models.SD15` settings: EPS prediction, 1000-step
  scaled-linear schedule, 8 heads, conv proj_in/proj_out), narrowed: 3 levels (32, 16, 8 at a 32x32 latent),
  one res block each, cross-attention at 16x16 and 8x8 (and the middle block).
- Text encoder: ComfyUI's SD1 CLIP-L (`SD1ClipModel`, real tokenizer, causal, final layer norm, the 'last'
  layer as SD1.x uses it), narrowed through ComfyUI's `clip_l_model_config` option.
- VAE: ComfyUI's TAESD class with fixed, hand-set weights (no learning): decode = each latent pixel shown as an
  8 x 8 block of colour rgb = latent[:3] * 0.18215 / 2 + 0.5 (`scenes.latent_to_rgb` after SD1.x's latent
  scale), encode = 8 x 8 block means mapped back. ReLUs stay linear because every activation carries a
  positive offset; TAESD's input clamp tanh(x / 3) * 3 is linear to 1e-4 because the latent enters it scaled
  by VAE_SCALE. So VAE Decode shows exactly the scene the latent holds, and VAE Encode of a render gives its
  training latent.

ComfyUI's checkpoint detection matches SD1.x only at its full width (model_channels 320, context_dim 768);
`register()` adds `WorldSD15` (the SD15 class with this model's widths) to `comfy.supported_models.models`,
so that Load Checkpoint (`load_checkpoint_guess_config`) detects and loads the file like any other.
"""
from __future__ import annotations

import inspect

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
from comfy.ldm.modules.attention import optimized_attention_for_device

from ..attention_patch.capture import attention_probabilities
from ..attention_patch.unet import cross_attention_layers

# UNet widths (model_channels, channel_mult). The shipped model's first level has two channels per GroupNorm group
# (world/README.md: at 32 channels, one per group, every norm removes each channel's mean, and the model cannot see
# the initial noise's); the first world model's narrow widths stay loadable.
SHIPPED_WIDTHS = (64, (1, 2, 2))
FIRST_MODEL_WIDTHS = (32, (1, 3, 3))
TEXT_CONFIG = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2}
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
    "use_temporal_resblock": False, "adm_in_channels": None, "use_linear_in_transformer": False,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "context_dim": TEXT_CONFIG["hidden_size"], "num_heads": 8, "num_head_channels": -1,
}
VAE_SCALE = 0.01     # TAESD's vae_scale: the latent enters the decoder's tanh clamp this small
_OFFSET = 2.0        # positive offset of the VAE's activations (ReLU = identity on them)
LATENT_SCALE = 0.18215  # SD1.x's latent_format scale factor


class WorldClipModel(comfy.sd1_clip.SD1ClipModel):
    """SD1.x's CLIP-L text encoder at the world model's width."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        model_options = {**model_options, "clip_l_model_config": {**TEXT_CONFIG, **model_options.get("clip_l_model_config", {})}}
        super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)


class WorldSD15(comfy.supported_models.SD15):
    """SD15 at the world model's widths (what checkpoint detection reads off its weights)."""
    unet_config = {"context_dim": TEXT_CONFIG["hidden_size"], "model_channels": SHIPPED_WIDTHS[0],
                   "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
                   "channel_mult": list(SHIPPED_WIDTHS[1])}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, WorldClipModel)


# The UNet widths checkpoint detection knows
UNET_WIDTHS = (FIRST_MODEL_WIDTHS, SHIPPED_WIDTHS)


def unet_widths(model_channels: int, channel_mult) -> tuple[int, tuple[int, ...]]:
    """Checked UNet widths: ComfyUI's UNet normalises with GroupNorm(32) and its output conv takes model_channels,
    so model_channels must be a multiple of 32 and channel_mult start at 1."""
    try:
        channel_mult = tuple(int(m) for m in channel_mult)
    except (TypeError, ValueError):
        channel_mult = ()
    if model_channels <= 0 or model_channels % 32 or len(channel_mult) != 3 or channel_mult[0] != 1 \
            or min(channel_mult) < 1:
        raise ValueError(f"world UNet widths model_channels={model_channels}, channel_mult={list(channel_mult)}: "
                         "model_channels must be a positive multiple of 32 (GroupNorm(32)) and channel_mult three "
                         "positive integers starting with 1 (the output conv takes model_channels), e.g. 64 and "
                         "[1, 2, 2]")
    return model_channels, channel_mult


def _detection_class(model_channels: int, channel_mult) -> type:
    config = {**WorldSD15.unet_config, "model_channels": model_channels, "channel_mult": list(channel_mult)}
    return type(WorldSD15.__name__, (WorldSD15,), {"unet_config": config})


def register() -> None:
    """Lets ComfyUI's checkpoint detection recognise the world model at each of UNET_WIDTHS, and the DiT world model
    (`world.dit`) (idempotent)."""
    from . import dit  # it builds on this module
    dit.register()
    for model_channels, channel_mult in UNET_WIDTHS:
        wanted = _detection_class(model_channels, channel_mult)
        if not any(getattr(model, "__name__", "") == wanted.__name__ and getattr(model, "unet_config", None) ==
                   wanted.unet_config for model in comfy.supported_models.models):
            comfy.supported_models.models.append(wanted)


def load_checkpoint(path) -> tuple:
    """MODEL, CLIP, VAE of a world checkpoint at any path, through ComfyUI's Load Checkpoint node
    (CheckpointLoaderSimple), as a workflow loads it; ComfyUI's checkpoint folders are left as they were."""
    import copy
    from pathlib import Path

    import folder_paths  # ComfyUI's top-level modules: imported late, the pack loads while `nodes` does
    import nodes
    register()
    path = Path(path).resolve()
    saved = copy.deepcopy(folder_paths.folder_names_and_paths["checkpoints"])
    try:
        folder_paths.add_model_folder_path("checkpoints", str(path.parent))
        folder_paths.filename_list_cache.pop("checkpoints", None)
        loader = nodes.CheckpointLoaderSimple  # V1 here; called as the executor would, should it move to V3
        if hasattr(loader, "execute") and not hasattr(loader, "FUNCTION"):
            return tuple(loader.execute(ckpt_name=path.name).args)[:3]
        return getattr(loader(), loader.FUNCTION)(ckpt_name=path.name)[:3]
    finally:
        folder_paths.folder_names_and_paths["checkpoints"] = saved
        folder_paths.filename_list_cache.pop("checkpoints", None)


# ---------------------------------------------------------------- building

def init_weights_(module: torch.nn.Module, generator: torch.Generator, starts_at_zero) -> None:
    """Defined starting values for every parameter (ComfyUI builds on empty tensors): weights ~ N(0, 1/fan_in),
    biases 0, norms 1, drawn in the order of the parameters; then 0 for those `starts_at_zero(name)` names (the
    last layer of each residual branch: the net starts as the identity)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / max(1, p[0].numel()) ** 0.5)
        for name, p in module.named_parameters():
            if starts_at_zero(name):
                p.zero_()


def _unet_branch_end(name: str) -> bool:
    return any(part in name for part in ("out_layers.3.", "proj_out.", "attn1.to_out.", "attn2.to_out.",
                                         "ff.net.2.")) or name.startswith("out.2.")


def make_unet_model(seed: int = 0, model_channels: int = SHIPPED_WIDTHS[0],
                    channel_mult=SHIPPED_WIDTHS[1]) -> comfy.model_base.BaseModel:
    model_channels, channel_mult = unet_widths(model_channels, channel_mult)
    config = WorldSD15({**UNET_CONFIG, "model_channels": model_channels, "channel_mult": list(channel_mult),
                        "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, torch.Generator().manual_seed(seed), _unet_branch_end)
    return model


def make_clip(seed: int = 1) -> comfy.sd.CLIP:
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, WorldClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    init_text_(clip, seed)
    return clip


def init_text_(clip: comfy.sd.CLIP, seed: int) -> None:
    """The text encoder's random start (both world models keep it frozen there): embeddings ~ N(0, 0.25), weights
    ~ N(0, 1/fan_in), biases 0, norms 1, drawn in the order of its parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1:
                p.fill_(1.0)
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


def text_model(clip: comfy.sd.CLIP):
    """ComfyUI's CLIPTextModel_ inside a CLIP (embeddings, encoder, final_layer_norm)."""
    return clip.cond_stage_model.clip_l.transformer.text_model


def vae_state_dict(latent_channels: int = 4, latent_scale: float = LATENT_SCALE,
                   latent_shift: float = 0.0) -> dict[str, torch.Tensor]:
    """TAESD weights of the fixed pixel <-> latent map (see the module docstring) for a latent format of
    `latent_channels` channels, scale and shift (SD1.x's by default; the DiT world model's: SD3's): the model's
    latent (latent - shift) * scale holds 2 * (rgb - 0.5) in channels 0-2 and 0 in the others."""
    from comfy.taesd.taesd import TAESD
    vae = TAESD(latent_channels=latent_channels)
    sd = {name: torch.zeros_like(value) for name, value in vae.state_dict().items()}

    def centre(weight, pairs, value):
        for out_channel, in_channel in pairs:
            weight[out_channel, in_channel, weight.shape[2] // 2, weight.shape[3] // 2] = value

    rgb = [(c, c) for c in range(3)]
    # decoder: Clamp, conv(4, 64), ReLU, Blocks (residual branch 0), Upsample + conv(identity) x3, Block, conv(64, 3)
    gain = latent_scale / (2 * VAE_SCALE)
    centre(sd["taesd_decoder.1.weight"], rgb, gain)
    sd["taesd_decoder.1.bias"][:3] = 0.5 + _OFFSET
    for index in (7, 12, 17):
        centre(sd[f"taesd_decoder.{index}.weight"], [(c, c) for c in range(64)], 1.0)
    centre(sd["taesd_decoder.19.weight"], rgb, 1.0)
    sd["taesd_decoder.19.bias"][:] = -_OFFSET
    # encoder: conv(3, 64) + offset, Blocks, stride-2 convs averaging 2 x 2, conv(64, 4)
    centre(sd["taesd_encoder.0.weight"], rgb, 1.0)
    sd["taesd_encoder.0.bias"][:3] = _OFFSET
    for index in (2, 6, 10):
        weight = sd[f"taesd_encoder.{index}.weight"]
        for c in range(64):
            weight[c, c, 1:3, 1:3] = 0.25
    back = VAE_SCALE * 2 / latent_scale
    centre(sd["taesd_encoder.14.weight"], rgb, back)
    sd["taesd_encoder.14.bias"][:3] = -back * (0.5 + _OFFSET)
    sd["vae_scale"] = torch.tensor(VAE_SCALE)
    sd["vae_shift"] = torch.tensor(float(latent_shift))
    return sd


def make_vae() -> comfy.sd.VAE:
    vae = comfy.sd.VAE(sd=vae_state_dict())
    vae.first_stage_model.requires_grad_(False)  # as loaded checkpoints are
    return vae


# ---------------------------------------------------------------- training forms

def encode_tokens(clip: comfy.sd.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The text encoder's output for token ids [B, 77], as ComfyUI's CLIP gives it for SD1.x (the final layer
    norm of the last layer), written with out-of-place residual adds so that autograd can train it (ComfyUI's
    CLIPLayer adds in place). Uses ComfyUI's own modules; inference keeps ComfyUI's code."""
    model = text_model(clip)
    x = model.embeddings(tokens, dtype=torch.float32)
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in model.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.final_layer_norm(x)


def tokenize(clip: comfy.sd.CLIP, captions: list[str]) -> torch.Tensor:
    """Token ids [B, 77] of each caption through the real SD1 tokenizer (start, words, end, end-padding)."""
    rows = []
    for text in captions:
        pairs = clip.tokenize(text)["l"]
        if len(pairs) != 1:
            raise ValueError(f"caption {text!r} is longer than one 77-token chunk")
        rows.append([int(token) for token, _ in pairs[0]])
    return torch.tensor(rows, dtype=torch.long)


class AttentionProbe:
    """attn2 replace patches for a training forward: each cross-attention layer computes its probabilities
    explicitly (softmax(q k^T / sqrt(d)), the pack's `attention_probabilities`), returns probs @ v, and keeps
    the head-averaged probabilities [B, h*w, 77] with their grid side, for the grounding terms."""

    def __init__(self, diffusion_model):
        self.layers = cross_attention_layers(diffusion_model)
        self.maps: list[torch.Tensor] = []

    def transformer_options(self) -> dict:
        patches = {layer.key: self._patch for layer in self.layers}
        return {"patches_replace": {"attn2": patches}}

    def _patch(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        probs = attention_probabilities(q, k, heads)                       # [B, heads, N, T]
        self.maps.append(probs.mean(dim=1))
        batch, _, inner = v.shape
        v = v.reshape(batch, v.shape[1], heads, inner // heads).transpose(1, 2)
        return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, -1, inner)


# ---------------------------------------------------------------- checkpoint

def checkpoint_state_dict(model: comfy.model_base.BaseModel, clip: comfy.sd.CLIP,
                          dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The single-file SD1.x state dict in ComfyUI's key layout (model.diffusion_model., cond_stage_model.,
    first_stage_model.), through the model config's own saving maps, every weight in `dtype` (the VAE's two
    scalars in fp32: its fixed map then holds to about 1e-3)."""
    unet = {k: v.detach().to(dtype).contiguous() for k, v in model.diffusion_model.state_dict().items()}
    text = {k: v.detach().to(dtype).contiguous() for k, v in clip.cond_stage_model.state_dict().items()}
    text.pop("clip_l.transformer.text_projection.weight", None)
    vae = {k: v if v.ndim == 0 else v.to(dtype) for k, v in vae_state_dict().items()}
    return state_dict_for_saving(model, unet, text, vae, dtype)


def state_dict_for_saving(model: comfy.model_base.BaseModel, unet: dict, text: dict, vae: dict,
                          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model config's own saving maps (its key prefixes) over the three parts' state dicts."""
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        sd = model.state_dict_for_saving(unet, clip_state_dict=text, vae_state_dict=vae)
    else:  # ComfyUI 0.3.x reads the UNet's weights itself
        sd = model.state_dict_for_saving(clip_state_dict=text, vae_state_dict=vae)
        sd = {k: v.detach().to(dtype) if k.startswith("model.diffusion_model.") else v for k, v in sd.items()}
    return {k: v.contiguous() for k, v in sd.items()}


def save_checkpoint(path, model, clip, metadata: dict[str, str] | None = None) -> None:
    comfy.utils.save_torch_file(checkpoint_state_dict(model, clip), str(path), metadata=metadata)
