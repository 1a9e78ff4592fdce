"""Which family a diffusion model belongs to, and what its capture reads: the one place that knows them all."""
from __future__ import annotations

from . import dit, unet
from .capture import CaptureLayout


def select_capture(diffusion_model, latent_shape, attention_resolution: int = 0, blocks: str = "") -> CaptureLayout:
    """The family of `diffusion_model` and what its capture reads (see unet.select_layers, dit.select_blocks)."""
    family = dit.family_of(diffusion_model)
    if family is not None:
        units, resolution = dit.select_blocks(family, diffusion_model, latent_shape, blocks)
        return CaptureLayout(dit, units, resolution, family.name, family, tuple(family.blocks(diffusion_model)),
                             diffusion_model)
    if blocks.strip():
        raise ValueError(f"'blocks' ({blocks!r}) selects DiT blocks (SD3, Flux); this is a UNet model: use "
                         "attention_resolution to choose its layers, and leave blocks empty")
    layers, resolution = unet.select_layers(diffusion_model, latent_shape, attention_resolution)
    return CaptureLayout(unet, layers, resolution, "unet", model=diffusion_model)
