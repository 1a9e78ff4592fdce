"""Tiny random SD1.5-, SD2-, SDXL-, SD3/SD3.5- and Flux-shaped models built from ComfyUI's own classes.

Used by the test suite, the benchmarks and ``python -m <pack> run --demo``. The architecture is
the real one (same block layout, attention placement, conditioning path, tokenizer), only narrower,
so every code path a real checkpoint takes is taken here. Weights are random and seeded: images made
with them are noise-like and say nothing about quality.

The DiT families (`DIT_FAMILIES`) are built the way ComfyUI's checkpoint loader builds them: the
unet config ComfyUI's model detection would read off a checkpoint of that shape, the family's
`comfy.supported_models` class, and its `get_model` (so model type and model sampling are ComfyUI's:
flow matching, x_t = sigma * noise + (1 - sigma) * x0, with the family's shift).

- sd3: SD3-medium-shaped MMDiT (no q/k norm), 3 joint blocks of 3 heads of 64 (ComfyUI's MMDiT fixes
  the head size at 64 and the heads at `depth`), the last block's text stream pre-only.
- sd35m: SD3.5-medium-shaped MMDiT-X: RMS q/k norm, and the image-only self-attention (`attn2`) in
  the first blocks (`x_block_self_attn_layers`).
- flux / flux_schnell: Flux.1 dev (guidance embedding, FLUX sampling with shift) / schnell (none,
  FLOW sampling with shift 1): 2 double-stream and 2 single-stream blocks, 2 heads of 32, RoPE axes
  (8, 12, 12) (the real (16, 56, 56) of 128, scaled), 2x2 patches of the 16-channel latent.

Text encoders are ComfyUI's own (`FluxClipModel`, `SD3ClipModel`) with the real shipped CLIP and T5
tokenizers, narrowed through ComfyUI's `<name>_model_config` options. SD3ClipModel pads the CLIP
features to 4096 and concatenates T5 after them along the tokens, so the SD3 T5 keeps the real width
4096 (and the real 32128-token vocabulary) with 2 narrow layers, stored in fp16 (computed in fp32 by
ComfyUI's manual cast, as fp16 T5 checkpoints are): its embedding is 32128 x 4096 (263 MB), the
one large tensor of the tiny models.
"""
from __future__ import annotations

import dataclasses
import math

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.text_encoders.sd2_clip

UNET_FAMILIES = ("sd15", "sd2", "sdxl")
DIT_FAMILIES = ("sd3", "sd35m", "flux", "flux_schnell")
FAMILIES = UNET_FAMILIES + DIT_FAMILIES

_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# SD1.x/SD2.x shape: 4 levels, attention at the first 3 (64/32/16 px latent at 512 px), 2 res blocks.
_SD_LAYOUT = {
    "model_channels": 32, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
# SDXL shape: 3 levels, no attention at the first, 2 transformer blocks at the second (real: 2 and 10).
_SDXL_LAYOUT = {
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 2, 2], "transformer_depth_middle": 2,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2], "num_classes": "sequential",
}
_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2}
_TEXT_G = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 2,
           "projection_dim": 96}


_CHUNKED_NUMEL = 1 << 24  # tensors above this are filled a block of rows at a time (the SD3 T5's 32128 x 4096
                         # embedding: no fp32 copy of it beside the fp16 one); no tensor of sd15/sd2/sdxl is this big


def _init_weights_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter gets a defined value (ComfyUI builds models on empty tensors; buffers: see
    `_init_dit_buffers_`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0:
                raise ValueError(f"tiny model parameter {name} is empty: the narrow config is inconsistent")
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            elif p.ndim == 0:  # scalars such as CLIP's logit_scale
                p.fill_(1.0)
            elif p.ndim == 1:  # norms
                p.copy_(1.0 + torch.randn(p.shape, generator=generator) * 0.02)
            elif p.numel() > _CHUNKED_NUMEL:
                fan_in = max(1, p[0].numel())
                rows = max(1, _CHUNKED_NUMEL // fan_in)
                for start in range(0, p.shape[0], rows):
                    block = p[start:start + rows]
                    block.copy_(torch.randn(block.shape, generator=generator) / math.sqrt(fan_in))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


def _unet_config(family: str) -> dict:
    if family == "sd15":
        # num_heads 8: ComfyUI's SD15 config forces it (unet_extra_config), whatever is asked for
        return {**_UNET_COMMON, **_SD_LAYOUT, "context_dim": _TEXT["hidden_size"], "num_heads": 8,
                "num_head_channels": -1, "use_linear_in_transformer": False, "adm_in_channels": None}
    if family == "sd2":
        return {**_UNET_COMMON, **_SD_LAYOUT, "context_dim": _TEXT["hidden_size"], "num_heads": -1,
                "num_head_channels": 16, "use_linear_in_transformer": True, "adm_in_channels": None}
    if family == "sdxl":
        return {**_UNET_COMMON, **_SDXL_LAYOUT, "context_dim": _TEXT["hidden_size"] + _TEXT_G["hidden_size"],
                "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True,
                "adm_in_channels": _TEXT_G["projection_dim"] + 6 * 256}
    if family in DIT_FAMILIES:
        raise ValueError(f"{family} is a DiT family: no UNet (and no ControlNet here); UNet families: "
                         f"{', '.join(UNET_FAMILIES)}")
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


# ---------------------------------------------------------------- DiT families (SD3/SD3.5 MMDiT, Flux)

_T5_SD3 = {"d_model": 4096, "d_kv": 16, "num_heads": 2, "d_ff": 32, "num_layers": 2}   # width forced by SD3ClipModel
_T5_FLUX = {"d_model": 64, "d_kv": 32, "num_heads": 2, "d_ff": 128, "num_layers": 2}
_T5_SD3_DTYPE = torch.float16  # storage; ComfyUI computes the T5 in fp32 (manual cast)
_SD3_DEPTH = 3                  # ComfyUI's MMDiT: hidden = 64 * depth, heads = depth (head size 64)
_SD3_POS_EMBED_MAX = 64         # patches per side (real: 192, 384 for SD3.5 medium): latents up to 128 x 128


def _sd3_unet_config(family: str) -> dict:
    """What comfy.model_detection reads off an MMDiT checkpoint of the tiny shape."""
    hidden = 64 * _SD3_DEPTH
    config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": _SD3_DEPTH, "input_size": None,
        # pooled: CLIP-L's unprojected pooled (SD3ClipModel asks CLIP-L for it) + CLIP-G's projected one
        "adm_in_channels": _TEXT["hidden_size"] + _TEXT_G["projection_dim"],
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": _T5_SD3["d_model"], "out_features": hidden}},
        "num_patches": _SD3_POS_EMBED_MAX ** 2, "pos_embed_max_size": _SD3_POS_EMBED_MAX,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }
    if family == "sd35m":  # SD3.5 medium: q/k RMS norm, MMDiT-X self-attention in the first blocks (real: 13 of 24)
        config.update(qk_norm="rms", x_block_self_attn_layers=list(range(_SD3_DEPTH - 1)))
    return config


def _flux_unet_config(family: str) -> dict:
    """What comfy.model_detection reads off a Flux.1 checkpoint of the tiny shape (only the fields this host's
    FluxParams has: they changed across ComfyUI versions)."""
    import comfy.ldm.flux.model
    config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "vec_in_dim": _TEXT["hidden_size"],       # CLIP-L's unprojected pooled output (FluxClipModel)
        "context_in_dim": _T5_FLUX["d_model"], "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
        "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
        "guidance_embed": family == "flux", "txt_ids_dims": [],
    }
    fields = {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)} | {"image_model"}
    return {key: value for key, value in config.items() if key in fields}


def _dit_model_config(family: str, dtype: torch.dtype):
    if family in ("sd3", "sd35m"):
        return comfy.supported_models.SD3({**_sd3_unet_config(family), "dtype": dtype})
    if family == "flux":
        return comfy.supported_models.Flux({**_flux_unet_config(family), "dtype": dtype})
    return comfy.supported_models.FluxSchnell({**_flux_unet_config(family), "dtype": dtype})


def _init_dit_buffers_(diffusion_model: torch.nn.Module) -> None:
    """The MMDiT's position embedding buffer (a checkpoint holds it; ComfyUI builds it empty): the fixed 2D
    sin-cos embedding over the whole pos_embed_max_size grid, from ComfyUI's own function."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    pos_embed = getattr(diffusion_model, "pos_embed", None)
    if pos_embed is not None:
        grid = diffusion_model.pos_embed_max_size
        values = torch.from_numpy(get_2d_sincos_pos_embed(pos_embed.shape[-1], grid)).float()
        with torch.no_grad():
            pos_embed.copy_(values.reshape(pos_embed.shape))


def latent_channels(family: str) -> int:
    """Channels of the family's latent (ComfyUI's latent_format): 4 for SD1.x/SD2.x/SDXL, 16 for SD3 and Flux."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    return 16 if family in DIT_FAMILIES else 4


def make_unet_model(family: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32,
                    manual_cast_dtype: torch.dtype | None = None) -> comfy.model_base.BaseModel:
    """The bare ComfyUI model (BaseModel subclass) with seeded random weights stored in `dtype`, computing in
    `dtype`, or in `manual_cast_dtype` through ComfyUI's manual-cast ops (as fp8 and fp16 checkpoints on
    hardware without those dtypes load). The random values are drawn in fp32 and rounded to `dtype`.

    For the DiT families it is the MMDiT (`comfy.model_base.SD3`) or Flux (`comfy.model_base.Flux`) model,
    made by the family's `supported_models` class as the checkpoint loader makes it."""
    if family in DIT_FAMILIES:
        model_config = _dit_model_config(family, dtype)
        model_config.set_inference_dtype(dtype, manual_cast_dtype)
        model = model_config.get_model({})
        _init_weights_(model.diffusion_model, seed)
        _init_dit_buffers_(model.diffusion_model)
        model.diffusion_model.to(dtype)
        return model
    config = {**_unet_config(family), "dtype": dtype}
    if family == "sd15":
        model_config = comfy.supported_models.SD15(config)
    elif family == "sd2":
        model_config = comfy.supported_models.SD20(config)
        model_config.unet_config["num_head_channels"] = config["num_head_channels"]  # SD20 forces 64
    else:
        model_config = comfy.supported_models.SDXL(config)
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    if family == "sd15":
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.EPS)
    elif family == "sd2":
        model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        model = comfy.model_base.SDXL(model_config, model_type=comfy.model_base.ModelType.EPS)
    _init_weights_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return model


def make_model(family: str = "sd15", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A MODEL as loaders give it: the tiny model wrapped in a ModelPatcher."""
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(make_unet_model(family, seed), load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


class _Target:
    def __init__(self, clip, tokenizer, params):
        self.clip, self.tokenizer, self.params = clip, tokenizer, params


def make_clip(family: str = "sd15", seed: int = 1) -> comfy.sd.CLIP:
    """A CLIP with the real shipped tokenizer of the family and a narrow random text encoder."""
    if family == "sd15":
        target = _Target(comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer,
                         {"model_options": {"clip_l_model_config": dict(_TEXT)}})
    elif family == "sd2":
        target = _Target(comfy.text_encoders.sd2_clip.SD2ClipModel, comfy.text_encoders.sd2_clip.SD2Tokenizer,
                         {"model_options": {"clip_h_model_config": dict(_TEXT, projection_dim=64)}})
    elif family == "sdxl":
        target = _Target(comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer,
                         {"model_options": {"clip_l_model_config": dict(_TEXT), "clip_g_model_config": dict(_TEXT_G)}})
    elif family in ("sd3", "sd35m"):
        import comfy.text_encoders.sd3_clip as sd3_clip
        target = _Target(sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=True, dtype_t5=_T5_SD3_DTYPE),
                         sd3_clip.SD3Tokenizer,
                         {"model_options": {"clip_l_model_config": dict(_TEXT), "clip_g_model_config": dict(_TEXT_G),
                                            "t5xxl_model_config": dict(_T5_SD3)}})
    elif family in ("flux", "flux_schnell"):
        import comfy.text_encoders.flux as flux_clip
        target = _Target(flux_clip.FluxClipModel, flux_clip.FluxTokenizer,
                         {"model_options": {"clip_l_model_config": dict(_TEXT), "t5xxl_model_config": dict(_T5_FLUX)}})
    else:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    model_options = target.params.pop("model_options")
    clip = comfy.sd.CLIP(target=target, model_options={**model_options, "dtype": torch.float32})
    _init_weights_(clip.cond_stage_model, seed)
    clip.cond_stage_model.requires_grad_(False)  # as loaded checkpoints are
    return clip


def make_vae(seed: int = 2, family: str = "sd15") -> comfy.sd.VAE:
    """A narrow SD-shaped VAE (8x downscale) with random weights, for the latents of `family`: 4 channels
    (SD1.x/SD2.x/SDXL) or 16 (SD3, Flux). It only decodes (and encodes): the latent scale and shift of a
    family are the model's latent_format, applied by the sampler, not by the VAE."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    channels = latent_channels(family)
    ddconfig = {"double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    params = {"ddconfig": ddconfig, "embed_dim": channels}
    reference = AutoencoderKL(**params)
    _init_weights_(reference, seed)
    vae = comfy.sd.VAE(sd=reference.state_dict(), config={"params": params})
    vae.latent_channels = channels  # what ComfyUI's detection sets from a checkpoint (the config path leaves 4)
    vae.first_stage_model.requires_grad_(False)  # as loaded checkpoints are
    return vae


# The tiny DiT ControlNets: SD3 (comfy.cldm.mmdit.ControlNet, as `load_controlnet_mmdit` builds it) with 1 joint
# block, whose output ComfyUI repeats over the main model's depth (3 // 1 - 1 = 2 residuals, after joint blocks 0
# and 1, one tensor); Flux (comfy.ldm.flux.controlnet.ControlNetFlux, XLabs form with a pixel hint, as
# `load_controlnet_flux_xlabs_mistoline` builds it) with 2 double blocks (residuals a, b on the main model's double
# blocks 0, 1) and 1 single block (one residual on both single blocks).
_SD3_CONTROLNET_BLOCKS = 1
_FLUX_CONTROLNET_DEPTH = {"depth": 2, "depth_single_blocks": 1}


def _make_dit_controlnet(family: str, seed: int):
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ops
    dtype = torch.float32
    operations = comfy.ops.pick_operations(dtype, None, disable_fast_fp8=True)
    unet_config = _dit_model_config(family, dtype).unet_config
    unet_config.pop("dtype", None)
    device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    if family == "sd3":
        import comfy.cldm.mmdit
        control_model = comfy.cldm.mmdit.ControlNet(
            num_blocks=_SD3_CONTROLNET_BLOCKS, control_latent_channels=unet_config["in_channels"],
            operations=operations, device=offload_device, dtype=dtype, **unet_config)
        _init_weights_(control_model, seed)
        _init_dit_buffers_(control_model)
        latent_format = comfy.latent_formats.SD3()
        latent_format.shift_factor = 0  # as load_controlnet_mmdit sets it
        return comfy.controlnet.ControlNet(control_model, compression_ratio=1, latent_format=latent_format,
                                           concat_mask=False, load_device=device, manual_cast_dtype=None)
    import comfy.ldm.flux.controlnet
    control_model = comfy.ldm.flux.controlnet.ControlNetFlux(
        mistoline=False, operations=operations, device=offload_device, dtype=dtype,
        **{**unet_config, **_FLUX_CONTROLNET_DEPTH})
    _init_weights_(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=device, manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


def make_controlnet(family: str = "sd15", seed: int = 3):
    """A CONTROL_NET for the tiny model of `family`, from ComfyUI's own classes, with random weights.

    UNet families: ComfyUI's cldm.ControlNet. sd3: the MMDiT ControlNet (`comfy.cldm.mmdit.ControlNet`), whose
    hint is VAE-encoded (apply it with a VAE: ControlNetApplyAdvanced's `vae`, or ControlNetApplySD3). flux and
    flux_schnell: the XLabs-form Flux ControlNet (`ControlNetFlux`, pixel hint, no VAE). Each is wrapped in
    `comfy.controlnet.ControlNet` with the arguments ComfyUI's loader for that format passes. SD3.5 ControlNets
    are another class (`load_controlnet_sd35`) and are not built here.

    The output projections (zero convolutions; the DiTs' `controlnet_blocks`), zeros in a fresh ControlNet, get
    seeded random weights instead (`_init_weights_`, as every other weight), so the control visibly acts.
    """
    if family in ("sd3", "flux", "flux_schnell"):
        return _make_dit_controlnet(family, seed)
    if family == "sd35m":
        raise ValueError("sd35m: SD3.5 ControlNets (ComfyUI's load_controlnet_sd35) are not built here; "
                         "DiT ControlNets: sd3, flux, flux_schnell")
    import comfy.cldm.cldm
    import comfy.controlnet
    config = {k: v for k, v in _unet_config(family).items() if k not in ("out_channels", "transformer_depth_output")}
    config.update(hint_channels=3, dtype=torch.float32, device=None)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    _init_weights_(control_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.controlnet.ControlNet(control_model, load_device=device, manual_cast_dtype=None)
