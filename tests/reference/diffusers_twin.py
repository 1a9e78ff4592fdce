"""A diffusers twin of the pack's tiny SD1.5 model, and traces of both sides of an Attend-and-Excite run.

The reference is diffusers' `StableDiffusionAttendAndExcitePipeline` (pipelines/deprecated/ since
diffusers 0.3x). Everything here is about making the two runs comparable:

- `diffusers_unet`: a `UNet2DConditionModel` with the same architecture as the ComfyUI `UNetModel`
  and the same weights (ComfyUI's own key map, `comfy.utils.unet_to_diffusers`).
- `ddim_scheduler` / `ddim_sigmas`: SD's DDIM schedule, and the ComfyUI sigmas on which Euler is
  DDIM with eta 0. ComfyUI's latent is x = z * sqrt(1 + sigma^2) (z: diffusers' latent); an Euler
  step from sigma_t to sigma_prev is exactly DDIM's step from abar_t to abar_prev when
  sigma = sqrt((1 - abar) / abar). DDIM's last step goes to abar_prev = alphas_cumprod[0]
  (set_alpha_to_one=False), so the last sigma is that one's, not 0.
- `ReferenceTrace` / `PackTrace`: wrap the methods each side computes the method with (the
  pipeline's `_compute_max_attention_per_index` / `_compute_loss` / `_update_latent`, our
  `GuidanceRun.loss` / `GuidanceRun.update`) and record, per sampling step, every guided forward
  (raw aggregated cross-attention, subject maps, smoothed peaks, loss) and every latent update (its
  gradient dL/dz and the latent after it), in z.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.utils

# SD1.x's training schedule (the values every SD1.x scheduler_config.json ships).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear"}


# ---------------------------------------------------------------- models

def diffusers_unet(comfy_model):
    """The diffusers UNet2DConditionModel twin of a ComfyUI SD1.x-shaped BaseModel, same weights (fp32, eval).

    Reads the config the model was built with (`model_config.unet_config`: SD15's extra config sets
    8 heads), so heads and widths follow the ComfyUI model whatever tiny_models sets.
    """
    from diffusers import UNet2DConditionModel

    config = comfy_model.model_config.unet_config
    levels = len(config["channel_mult"])
    per_block = set(config["num_res_blocks"])
    if len(per_block) != 1 or config.get("num_head_channels", -1) != -1 or config.get("adm_in_channels"):
        raise ValueError("diffusers_unet handles SD1.x-shaped UNets only (equal res blocks per level, "
                         "num_heads set, no ADM input)")
    depth = config["transformer_depth"]
    attention_levels = [any(depth[level * 2:(level + 1) * 2]) for level in range(levels)]
    unet = UNet2DConditionModel(
        sample_size=config["image_size"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
        block_out_channels=tuple(config["model_channels"] * m for m in config["channel_mult"]),
        layers_per_block=per_block.pop(),
        cross_attention_dim=config["context_dim"],
        attention_head_dim=config["num_heads"],  # diffusers' legacy name: the number of heads in SD1.x configs
        use_linear_projection=config["use_linear_in_transformer"],
    )
    mapping = comfy.utils.unet_to_diffusers(config)  # diffusers key -> ComfyUI key
    source = comfy_model.diffusion_model.state_dict()
    target = unet.state_dict()
    missing = [key for key in target if key not in mapping]
    if missing:
        raise ValueError(f"no ComfyUI weight for diffusers keys {missing[:5]} (+{max(0, len(missing) - 5)})")
    unused = set(source) - {mapping[key] for key in target}
    if unused:
        raise ValueError(f"ComfyUI weights with no diffusers key: {sorted(unused)[:5]}")
    unet.load_state_dict({key: source[mapping[key]].detach().clone().float() for key in target})
    return unet.eval().requires_grad_(False)


def ddim_scheduler():
    """diffusers' DDIMScheduler as SD1.x pipelines configure it (eta 0 by default)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(**SD_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                         timestep_spacing="leading")


def ddim_sigmas(scheduler, steps: int) -> torch.Tensor:
    """ComfyUI sigmas on which Euler equals `scheduler`'s DDIM (eta 0) over `steps` steps: [steps + 1]."""
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    prev = [abar[t] for t in scheduler.timesteps] + [scheduler.final_alpha_cumprod.double()]
    return torch.stack([((1 - a) / a).sqrt() for a in prev]).float()


def z_from_x(x: torch.Tensor, sigma) -> torch.Tensor:
    """diffusers' latent z from ComfyUI's x at `sigma` (EPS models): z = x / sqrt(1 + sigma^2)."""
    return x / (1.0 + float(sigma) ** 2) ** 0.5


def attend_and_excite_pipeline(unet, scheduler, host: Path):
    """The reference pipeline around `unet`, with tiny stand-ins for the parts the test never uses.

    The VAE only sets the 8x scale factor (output_type='latent'); the text encoder is never run
    (prompt_embeds are given); the tokenizer is the real SD1.x one that ships with the ComfyUI host.
    """
    from diffusers import AutoencoderKL
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
        StableDiffusionAttendAndExcitePipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=unet.config.cross_attention_dim, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2))
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(host) / "comfy" / "sd1_tokenizer"))
    pipe = StableDiffusionAttendAndExcitePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- traces

@dataclass
class Forward:
    """One guided forward of one image: what the loss was computed from."""
    aggregated: torch.Tensor   # [H*W, T] mean over heads and layers of the captured resolution
    maps: torch.Tensor         # [S, H, W] subject maps after the start-token drop and the softmax(100 x)
    peaks: torch.Tensor        # [S] max of each smoothed subject map
    loss: float


@dataclass
class StepTrace:
    forwards: list[Forward] = field(default_factory=list)
    updates: list[torch.Tensor] = field(default_factory=list)   # [C, H, W] latent z after each update
    gradients: list[torch.Tensor] = field(default_factory=list) # [C, H, W] dL/dz of each update
    changes: list[float] = field(default_factory=list)          # relative size of each update
    latent: torch.Tensor | None = None                          # [B, C, H, W] z the sampler step started from


class ReferenceTrace:
    """Records a StableDiffusionAttendAndExcitePipeline run.

    Forwards and updates are those of image 0 only when the batch is 1 (the pipeline guides one
    image at a time and nothing tells its images apart here); `latent` and `refinements` hold every
    image. The refinement loop's first forward is at the very latent the step's forward just saw
    (the reference re-runs it); it is left out, so that each step lists distinct forwards, like ours.

    max_refinement_steps: the pipeline's __call__ leaves `_perform_iterative_refinement_step` at its
    default (20); a value here is passed to it instead, to match a GuidanceConfig with another cap.
    """

    def __init__(self, pipe, max_refinement_steps: int | None = None):
        self.pipe = pipe
        self.max_refinement_steps = max_refinement_steps
        self.steps: dict[int, StepTrace] = {}
        self.refinements: dict[int, list[int]] = {}   # step -> updates made by each refinement call
        self.step = 0
        self._skip_forward = False
        self._pending: dict | None = None

    def _trace(self) -> StepTrace:
        return self.steps.setdefault(self.step, StepTrace())

    @contextlib.contextmanager
    def installed(self):
        pipe = self.pipe
        compute_max = pipe._compute_max_attention_per_index
        compute_loss = pipe._compute_loss
        update_latent = pipe._update_latent
        refine = pipe._perform_iterative_refinement_step
        scheduler_step = pipe.scheduler.step

        def traced_compute_max(attention_maps, indices):
            aggregated = attention_maps.detach().clone()     # the reference scales it in place
            peaks = compute_max(attention_maps=attention_maps, indices=indices)
            # the reference's own lines: attention_maps[:, :, 1:-1] * 100, softmax, index - 1
            text = torch.softmax(aggregated[:, :, 1:-1] * 100, dim=-1)
            maps = torch.stack([text[:, :, i - 1] for i in indices])
            self._pending = {"aggregated": aggregated.reshape(-1, aggregated.shape[-1]), "maps": maps,
                             "peaks": torch.stack([p.detach() for p in peaks])}
            return peaks

        def traced_compute_loss(max_attention_per_index):
            loss = compute_loss(max_attention_per_index)
            pending, self._pending = self._pending, None
            if self._skip_forward:
                self._skip_forward = False
            else:
                self._trace().forwards.append(Forward(**pending, loss=float(torch.as_tensor(loss).detach())))
            return loss

        def traced_update_latent(latents, loss, step_size):
            with gradients_into([]) as gradients:
                out = update_latent(latents, loss, step_size)
            self._trace().gradients.append(gradients[-1][0])
            self._trace().updates.append(out.detach()[0].clone())
            self._trace().changes.append(relative_error(out.detach(), latents.detach()))
            return out

        def traced_refine(*args, **kwargs):
            self._skip_forward = True
            if self.max_refinement_steps is not None:
                kwargs["max_refinement_steps"] = self.max_refinement_steps
            before = len(self._trace().updates)
            out = refine(*args, **kwargs)
            self.refinements.setdefault(self.step, []).append(len(self._trace().updates) - before)
            return out

        def traced_scheduler_step(model_output, timestep, sample, *args, **kwargs):
            self._trace().latent = sample.detach().clone()
            out = scheduler_step(model_output, timestep, sample, *args, **kwargs)
            self.step += 1
            return out

        pipe._compute_max_attention_per_index = traced_compute_max
        pipe._compute_loss = traced_compute_loss
        pipe._update_latent = traced_update_latent
        pipe._perform_iterative_refinement_step = traced_refine
        pipe.scheduler.step = traced_scheduler_step
        try:
            yield self
        finally:
            for name in ("_compute_max_attention_per_index", "_compute_loss", "_update_latent",
                         "_perform_iterative_refinement_step"):
                del pipe.__dict__[name]
            del pipe.scheduler.__dict__["step"]


class PackTrace:
    """Records our AttentionSampler's guidance (GuidanceRun.loss / .update) of image 0, in z.

    `callback` is for comfy.sample.sample_custom: it records the latent each sampler step starts from.
    """

    def __init__(self, sampler_module, losses_module, sigmas: torch.Tensor):
        self.sampler_module = sampler_module
        self.losses = losses_module
        self.sigmas = sigmas
        self.steps: dict[int, StepTrace] = {}
        self.step = 0
        self._pending: dict | None = None

    def _trace(self, step=None) -> StepTrace:
        return self.steps.setdefault(self.step if step is None else step, StepTrace())

    def callback(self, step, denoised, x, total_steps):
        self._trace(step).latent = z_from_x(x.detach(), self.sigmas[step]).clone()

    @contextlib.contextmanager
    def installed(self):
        run_class = self.sampler_module.GuidanceRun
        losses = self.losses
        guide, loss, update = run_class.guide, run_class.loss, run_class.update
        subject_maps = losses.subject_attention_maps
        trace = self

        def traced_subject_maps(aggregated, *args, **kwargs):
            maps = subject_maps(aggregated, *args, **kwargs)
            trace._pending = {"aggregated": aggregated.detach()[0].clone(), "maps": maps.detach()[0].clone(),
                              "peaks": losses.max_attention_per_subject(maps.detach())[0]}
            return maps

        def traced_guide(self, x, step, sigma, *args, **kwargs):
            trace.step = step
            return guide(self, x, step, sigma, *args, **kwargs)

        def traced_loss(self, x, sigma):
            total, terms, maps = loss(self, x, sigma)
            trace._trace().forwards.append(Forward(**trace._pending, loss=float(total.detach()[0])))
            trace._pending = None
            return total, terms, maps

        def traced_update(self, x, total, sigma, step_size, active=None):
            with gradients_into([]) as gradients:
                out = update(self, x, total, sigma, step_size, active)
            # dL/dz = dL/dx * dx/dz = dL/dx * sqrt(1 + sigma^2)
            trace._trace().gradients.append(gradients[-1][0] * (1.0 + float(sigma) ** 2) ** 0.5)
            trace._trace().updates.append(z_from_x(out.detach()[0], sigma).clone())
            trace._trace().changes.append(relative_error(out.detach()[:1], x.detach()[:1]))
            return out

        losses.subject_attention_maps = traced_subject_maps
        run_class.guide, run_class.loss, run_class.update = traced_guide, traced_loss, traced_update
        try:
            yield self
        finally:
            losses.subject_attention_maps = subject_maps
            run_class.guide, run_class.loss, run_class.update = guide, loss, update


@contextlib.contextmanager
def gradients_into(out: list):
    """Appends what torch.autograd.grad returns while active (both sides take their update's gradient with it)."""
    grad = torch.autograd.grad

    def recording_grad(*args, **kwargs):
        result = grad(*args, **kwargs)
        out.append(result[0].detach().clone())
        return result

    torch.autograd.grad = recording_grad
    try:
        yield out
    finally:
        torch.autograd.grad = grad


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference| (the relative error of the largest entry)."""
    ours, reference = torch.as_tensor(ours).double(), torch.as_tensor(reference).double()
    if ours.shape != reference.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(ours.shape)}, reference {tuple(reference.shape)}")
    scale = reference.abs().max().clamp(min=1e-30)
    return float((ours - reference).abs().max() / scale)
