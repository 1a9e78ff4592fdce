"""The DiT world model (issue 16): a narrow SD3-family model (ComfyUI's MMDiT) built from ComfyUI's own classes, for
the effect table's DiT rows.

- MMDiT: ComfyUI's `MMDiT` as `comfy.supported_models.SD3` builds it (rectified flow, shift 3, SD3's 16-channel
  latent format), DEPTH joint blocks of DEPTH heads of 64 (ComfyUI ties the width to the depth: hidden = 64 x
  depth), patch 2 (a 32x32 latent is 16x16 tokens), no q/k norm (SD3 medium's blocks).
- Text: SD3's own text stack (`SD3Tokenizer`, `SD3ClipModel`) with CLIP-L alone loaded, as SD3 runs without
  CLIP-G and T5-XXL: CLIP-L's penultimate layer, padded to 4096 wide, is the context; its unprojected pooled output
  plus CLIP-G's zeros is the pooled vector. CLIP-L is narrowed to the SD1.x world model's width (64, 4 layers)
  and holds the same frozen random weights (the same seed), so both world models read the same text features.
- VAE: the SD1.x world model's hand-set TAESD map at 16 channels and SD3's latent scale and shift: channels 0-2
  of the model's latent are the picture (2 * (rgb - 0.5)), the other 13 are 0.

ComfyUI detects an MMDiT checkpoint as SD3 from its weights and would build SD3's full-width text encoders for it;
`register()` puts `WorldSD3` (SD3 with this text encoder, told apart by its pooled width) before SD3 in
`comfy.supported_models.models`, so that Load Checkpoint loads the file like any other, with the pack installed.
"""
from __future__ import annotations

import torch

import comfy.model_base
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.sd3_clip as sd3_clip
import comfy.utils

from . import model as world_model

DEPTH = 3                   # ComfyUI's MMDiT: hidden 64 x depth, depth heads of 64
POS_EMBED_MAX = 32          # patches per side: latents up to 64 x 64 (512 px)
CLIP_G_POOLED = 1280        # SD3ClipModel pads the pooled vector with CLIP-G's zeros when CLIP-G is absent
CONTEXT_WIDTH = 4096        # ... and the context to T5-XXL's width
LATENT_FORMAT = comfy.supported_models.SD3.latent_format


def unet_config(depth: int = DEPTH) -> dict:
    """What comfy.model_detection reads off the world MMDiT's checkpoint."""
    hidden = 64 * depth
    return {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
        "adm_in_channels": world_model.TEXT_CONFIG["hidden_size"] + CLIP_G_POOLED,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": CONTEXT_WIDTH, "out_features": hidden}},
        "num_patches": POS_EMBED_MAX ** 2, "pos_embed_max_size": POS_EMBED_MAX,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }


class WorldSD3ClipModel(sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)):
    """SD3's text encoder with CLIP-L alone, at the world model's width."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        config = {**world_model.TEXT_CONFIG, **model_options.get("clip_l_model_config", {})}
        super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": config})


class WorldSD3(comfy.supported_models.SD3):
    """SD3 with the world model's text encoder, told apart from SD3 by the pooled width (64 + CLIP-G's 1280)."""
    unet_config = {"in_channels": 16, "pos_embed_scaling_factor": None,
                   "adm_in_channels": world_model.TEXT_CONFIG["hidden_size"] + CLIP_G_POOLED}

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(sd3_clip.SD3Tokenizer, WorldSD3ClipModel)


def register() -> None:
    """Lets checkpoint detection recognise the world MMDiT: before SD3, which matches it too (idempotent)."""
    models = comfy.supported_models.models
    if any(getattr(m, "__name__", "") == WorldSD3.__name__ for m in models):
        return
    at = next((i for i, m in enumerate(models) if m is comfy.supported_models.SD3), len(models))
    models.insert(at, WorldSD3)


# ---------------------------------------------------------------- building

def _init_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """The world model's starting values (world.model.init_weights_) with DiT's adaLN-Zero: each block's modulation
    and the final linear 0, so that every block starts as the identity and the net's output at 0; and the fixed 2D
    sin-cos position embedding (a checkpoint holds it; ComfyUI builds it empty)."""
    world_model.init_weights_(module, generator, lambda name: "adaLN_modulation" in name
                              or name.startswith("final_layer.linear."))
    pos_embed = getattr(module, "pos_embed", None)
    if pos_embed is not None:
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
        values = torch.from_numpy(get_2d_sincos_pos_embed(pos_embed.shape[-1], module.pos_embed_max_size))
        with torch.no_grad():
            pos_embed.copy_(values.float().reshape(pos_embed.shape))


LOCAL_FREQUENCY = 0.2       # sin-cos frequencies (radians per token) that change within a few tokens
LOCAL_SELF_LOGIT = 2.0      # the local heads' logit of a token's own key at the start


def local_dims(hidden: int) -> torch.Tensor:
    """The dims of the 2D sin-cos embedding (ComfyUI's layout: [sin, cos] of one axis, then of the other, each over
    hidden / 4 frequencies 10000^(-k / (hidden / 4))) whose frequency is at least LOCAL_FREQUENCY."""
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    k = (omega >= LOCAL_FREQUENCY).nonzero().flatten()
    return torch.cat([k + i * quarter for i in range(4)])


def local_attention_init_(mmdit, strength: float, self_logit: float = LOCAL_SELF_LOGIT) -> None:
    """Starts the image stream's self-attention local, as a convolution is: in each joint block, head h's first
    query and key rows read the position embedding's fast dims (`local_dims`) with the factor sqrt(strength / 2^h),
    so that q_i . k_j ~ sum of cos(omega (i - j)) peaks on the token itself and falls within a few tokens (heads of
    three widths). One more q / k row pair holds biases only, a constant logit for every image key that brings a
    token's own down to `self_logit` (measured on a unit-normal latent): else the image keys' peak would leave
    the text keys (logit ~0) no share. Biases, not a weight on a constant-looking dim: adaLN's shift on such a
    dim would scale that offset, and in a pilot it sent all attention to the text. The patch embedding writes
    nothing into the fast dims, so at the start they hold the position alone. A prior, not a constraint: every
    weight trains. Why: trained from the generic start, the MMDiT's image attention stayed as wide as uniform
    after 4,000 batches and it drew each pixel on its own (speckle), without the neighbourhoods a UNet's
    convolutions have."""
    dims = local_dims(mmdit.hidden_size)
    head_dim = mmdit.hidden_size // mmdit.num_heads
    if len(dims) + 1 > head_dim:
        raise ValueError(f"{len(dims)} local dims do not fit a head of {head_dim}")
    rows, extra = torch.arange(len(dims)), len(dims)
    with torch.no_grad():
        mmdit.x_embedder.proj.weight[dims] = 0.0
        mmdit.x_embedder.proj.bias[dims] = 0.0
        # what the blocks' norm1 sees at the start, on a unit-normal latent (the noisy input's scale): the content
        # shares the norm with the position, so the fast dims' size is measured, not assumed
        side = mmdit.pos_embed_max_size // 2 * mmdit.patch_size
        latent = torch.randn(1, mmdit.in_channels, side, side, generator=torch.Generator().manual_seed(0))
        tokens = mmdit.x_embedder(latent.to(mmdit.x_embedder.proj.weight)) + mmdit.cropped_pos_embed(latent.shape[-2:])
        normed = torch.nn.functional.layer_norm(tokens[0].float(), tokens.shape[-1:])
        fast = float((normed[:, dims] ** 2).sum(-1).mean())
        for block in mmdit.joint_blocks:
            weight, bias = block.x_block.attn.qkv.weight, block.x_block.attn.qkv.bias
            for head in range(mmdit.num_heads):
                factor = (strength / 2 ** head) ** 0.5
                q, k = head * head_dim, mmdit.hidden_size + head * head_dim  # the head's first q row, k row
                for start in (q, k):
                    weight[start + rows] = 0.0
                    weight[start + rows, dims] = factor
                    weight[start + extra] = 0.0
                    bias[start + rows] = 0.0
                offset = factor ** 2 * fast / head_dim ** 0.5 - self_logit
                bias[q + extra], bias[k + extra] = 1.0, -offset * head_dim ** 0.5


def make_model(seed: int = 0, depth: int = DEPTH, local_attention: float = 0.0) -> comfy.model_base.BaseModel:
    """The world MMDiT (comfy.model_base.SD3), seeded, fp32; local_attention > 0: `local_attention_init_`."""
    if depth < 1:
        raise ValueError(f"world MMDiT depth {depth}: must be at least 1 (ComfyUI's MMDiT: hidden 64 x depth)")
    if local_attention < 0:
        raise ValueError(f"local_attention {local_attention}: must be 0 (off) or positive")
    config = WorldSD3({**unet_config(depth), "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _init_(model.diffusion_model, torch.Generator().manual_seed(seed))
    if local_attention:
        local_attention_init_(model.diffusion_model, local_attention)
    return model


def make_clip(seed: int = 1) -> comfy.sd.CLIP:
    """The text encoder at the SD1.x world model's frozen random weights for the same seed."""
    target = comfy.supported_models_base.ClipTarget(sd3_clip.SD3Tokenizer, WorldSD3ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    world_model.init_text_(clip, seed)
    clip.cond_stage_model.requires_grad_(False)
    return clip


def vae_state_dict() -> dict[str, torch.Tensor]:
    return world_model.vae_state_dict(latent_channels=16, latent_scale=LATENT_FORMAT().scale_factor,
                                      latent_shift=LATENT_FORMAT().shift_factor)


def make_vae() -> comfy.sd.VAE:
    vae = comfy.sd.VAE(sd=vae_state_dict())
    vae.first_stage_model.requires_grad_(False)
    return vae


def to_model_latent(latent: torch.Tensor) -> torch.Tensor:
    """A 4-channel world latent (scenes.rgb_to_latent: channels 0-2 the picture, 3 zero) as this model's 16."""
    return torch.nn.functional.pad(latent, (0, 0, 0, 0, 0, 16 - latent.shape[1]))


# ---------------------------------------------------------------- training forms

class TextCache:
    """Context [77, 4096] and pooled [1344] of each caption through ComfyUI's own SD3 text encoder (frozen, so no
    autograd form is needed), computed once per caption: the world's captions are few."""

    def __init__(self, clip: comfy.sd.CLIP):
        self.clip, self.cached = clip, {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for text in set(captions) - set(self.cached):
            with torch.no_grad():
                context, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            if context.shape[1] != 77:
                raise ValueError(f"caption {text!r} is longer than one 77-token chunk")
            self.cached[text] = (context[0].float(), pooled[0].float())
        return (torch.stack([self.cached[t][0] for t in captions]), torch.stack([self.cached[t][1] for t in captions]))


class JointAttentionProbe:
    """optimized_attention_override for a training forward of the MMDiT: each joint attention computes its
    probabilities explicitly over [text, image] keys and returns probs @ v (differentiable), keeping the
    head-averaged image-query x text-key slice [B, image tokens, text tokens], the slice the pack's DiT capture
    reads (attention_patch.dit), for the grounding terms."""

    def __init__(self, text_tokens: int):
        self.text = text_tokens
        self.maps: list[torch.Tensor] = []

    def transformer_options(self) -> dict:
        return {"optimized_attention_override": self}

    def __call__(self, func, *args, **kwargs):
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        if kwargs.get("skip_reshape", False) or q.shape[1] != k.shape[1]:
            return func(*args, **kwargs)
        batch, length, inner = q.shape
        q4, k4, v4 = (t.reshape(batch, length, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
        probs = ((q4 * (inner // heads) ** -0.5) @ k4.transpose(-1, -2)).softmax(dim=-1)  # [B, heads, L, L]
        self.maps.append(probs[:, :, self.text:, :self.text].mean(dim=1))
        return (probs @ v4).transpose(1, 2).reshape(batch, length, inner)


def image_attention(diffusion_model, x, timesteps, context, pooled) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per joint block: the image queries' softmax over [text, image] keys [B, heads, image tokens, all keys]
    (recomputed from the block's q and k beside the host attention, which runs unchanged); and the model's output
    of that same forward."""
    seen = []

    def keep(func, *args, **kwargs):
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        q, k = (t.float().reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in args[:2])
        text = k.shape[2] - (x.shape[-2] // diffusion_model.patch_size) * (x.shape[-1] // diffusion_model.patch_size)
        seen.append(((q[:, :, text:] @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1))
        return func(*args, **kwargs)

    with torch.no_grad():
        output = diffusion_model(x, timesteps, context=context, y=pooled,
                                 transformer_options={"optimized_attention_override": keep})
    return seen, output


def attention_spread(probs: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: the mean distance in tokens from an image query to the image keys it attends to (uniform over a
    16x16 grid: 8.4), and the text keys' share, of `image_attention`'s probabilities on a side x side grid."""
    grid = torch.stack(torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij"), -1)
    distance = torch.cdist(grid.reshape(-1, 2), grid.reshape(-1, 2))
    image = probs[..., -side * side:]
    spread = ((image * distance).sum(-1) / image.sum(-1).clamp(min=1e-30)).mean(dim=(0, 2))
    return spread, probs[..., :-side * side].sum(-1).mean(dim=(0, 2))


def checkpoint_state_dict(model: comfy.model_base.BaseModel, clip: comfy.sd.CLIP,
                          dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The single-file SD3-layout state dict (model.diffusion_model., text_encoders.clip_l., first_stage_model.),
    through the model config's own saving maps; weights in `dtype`, the VAE's two scalars in fp32."""
    unet = {k: v.detach().to(dtype).contiguous() for k, v in model.diffusion_model.state_dict().items()}
    text = {k: v.detach().to(dtype).contiguous() for k, v in clip.cond_stage_model.state_dict().items()}
    text.pop("clip_l.transformer.text_projection.weight", None)  # unused: SD3 reads CLIP-L's unprojected pooled
    vae = {k: v if v.ndim == 0 else v.to(dtype) for k, v in vae_state_dict().items()}
    return world_model.state_dict_for_saving(model, unet, text, vae, dtype)


def save_checkpoint(path, model, clip, metadata: dict[str, str] | None = None) -> None:
    comfy.utils.save_torch_file(checkpoint_state_dict(model, clip), str(path), metadata=metadata)
