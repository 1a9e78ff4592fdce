"""Tiny random SD1.5-, SD2- and SDXL-shaped models built from ComfyUI's own classes.

Used by the test suite, the benchmarks and ``python -m <pack> run --demo``. The architecture is
the real one (same block layout, attention placement, conditioning path, tokenizer), only narrower,
so every code path a real checkpoint takes is taken here. Weights are random and seeded: images made
with them are noise-like and say nothing about quality.
"""
from __future__ import annotations

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

FAMILIES = ("sd15", "sd2", "sdxl")

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


def _init_weights_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer gets a defined value (ComfyUI builds models on empty tensors)."""
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
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def make_unet_model(family: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32,
                    manual_cast_dtype: torch.dtype | None = None) -> comfy.model_base.BaseModel:
    """The bare ComfyUI model (BaseModel subclass) with seeded random weights stored in `dtype`, computing in
    `dtype`, or in `manual_cast_dtype` through ComfyUI's manual-cast ops (as fp8 and fp16 checkpoints on
    hardware without those dtypes load). The random values are drawn in fp32 and rounded to `dtype`."""
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
    else:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    model_options = target.params.pop("model_options")
    clip = comfy.sd.CLIP(target=target, model_options={**model_options, "dtype": torch.float32})
    _init_weights_(clip.cond_stage_model, seed)
    clip.cond_stage_model.requires_grad_(False)  # as loaded checkpoints are
    return clip


def make_vae(seed: int = 2) -> comfy.sd.VAE:
    """A narrow SD-shaped VAE (8x downscale, 4 latent channels) with random weights."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    params = {"ddconfig": ddconfig, "embed_dim": 4}
    reference = AutoencoderKL(**params)
    _init_weights_(reference, seed)
    vae = comfy.sd.VAE(sd=reference.state_dict(), config={"params": params})
    vae.first_stage_model.requires_grad_(False)  # as loaded checkpoints are
    return vae


def make_controlnet(family: str = "sd15", seed: int = 3):
    """A CONTROL_NET for the tiny model of `family` (ComfyUI's cldm.ControlNet), with random weights.

    The zero convolutions get small random weights instead of zeros, so the control visibly acts.
    """
    import comfy.cldm.cldm
    import comfy.controlnet
    config = {k: v for k, v in _unet_config(family).items() if k not in ("out_channels", "transformer_depth_output")}
    config.update(hint_channels=3, dtype=torch.float32, device=None)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    _init_weights_(control_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.controlnet.ControlNet(control_model, load_device=device, manual_cast_dtype=None)
