"""The guided sampling loop: the one place that knows ComfyUI's sampler, sigmas and latent scaling.

`AttentionSampler` is a `KSAMPLER` wrapping any built-in sampler. Without guidance it runs the inner
sampler once over the whole schedule (so its latent equals KSampler's bit for bit) and only records
maps. With guidance it runs the inner sampler one step at a time over the guided range, changing
the latent before each step (Attend-and-Excite / A-STAR), then the rest of the schedule in one go.
Multistep samplers (dpmpp_2m, ...) restart their history at each guided segment; ancestral and SDE
samplers get a fresh noise seed per segment (seed + segment index) so no noise is reused.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

import comfy.model_management
import comfy.samplers

from ..attention_patch.capture import AttentionCapture, TruncatedPass, select_layers
from ..attention_patch.record import AttentionRecord, StepLoss
from ..subjects import Subjects
from . import losses as L
from .differentiable import GuidedPassMode, recompute_feedforward

log = logging.getLogger(__name__)

# Attend-and-Excite's published defaults, as fractions of the schedule (the paper: 50 steps).
DEFAULT_REFINEMENT = ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))


@dataclass(frozen=True)
class GuidanceConfig:
    """What the guidance does. Fractions are of the sampling schedule (0 = first step, 1 = end)."""
    loss_weights: dict[str, float] = field(default_factory=lambda: {"attend_and_excite": 1.0})
    scale_factor: float = 20.0
    guidance_start: float = 0.0
    guidance_end: float = 0.5            # A&E: max_iter_to_alter = 25 of 50 steps
    refinement: tuple[tuple[float, float], ...] = DEFAULT_REFINEMENT  # (step fraction, threshold)
    max_refinement_steps: int = 20
    temperature: float = 100.0
    exclude_padding: bool = False        # the authors' SD2 variant
    smoothing_sigma: float = 0.5
    retention_threshold: float = 0.5
    truncate_pass: bool = True
    recompute_feedforward: bool = True  # guided pass: recompute feed-forward activations in the backward

    @property
    def enabled(self) -> bool:
        return any(w != 0 for w in self.loss_weights.values()) and self.guidance_end > self.guidance_start

    def guided_steps(self, steps: int) -> range:
        return range(int(round(self.guidance_start * steps)), int(round(self.guidance_end * steps)))

    def step_sizes(self, steps: int) -> np.ndarray:
        """alpha_i = scale_factor * sqrt(linspace(1.0, 0.5, steps)[i]) (the reference's schedule)."""
        return self.scale_factor * np.sqrt(np.linspace(1.0, 0.5, steps))

    def refinement_thresholds(self, steps: int) -> dict[int, float]:
        return {int(round(fraction * steps)): threshold for fraction, threshold in self.refinement}


def validate_config(config: GuidanceConfig, subjects: Subjects) -> list[str]:
    """Raises on unusable settings; returns warnings for losses that are skipped (and why)."""
    unknown = [n for n in config.loss_weights if n not in L.LOSSES]
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; valid: {', '.join(L.LOSSES)}")
    if any(w < 0 or not math.isfinite(w) for w in config.loss_weights.values()):
        raise ValueError(f"loss weights must be finite and >= 0, got {config.loss_weights}")
    if not 0.0 <= config.guidance_start <= config.guidance_end <= 1.0:
        raise ValueError(f"the guided step range must satisfy 0 <= start <= end <= 1 (fractions of the schedule), "
                         f"got start={config.guidance_start}, end={config.guidance_end}")
    if len(subjects) == 0:
        raise ValueError("no subject tokens: connect the SUBJECTS output of Attention Text Encode")
    warnings = []
    outside = [f for f, _t in config.refinement if not config.guidance_start <= f < config.guidance_end]
    if outside and config.enabled:
        warnings.append(f"refinement at step fraction(s) {outside} lies outside the guided range "
                        f"[{config.guidance_start}, {config.guidance_end}) and is not applied")
    if config.refinement and config.enabled and not config.loss_weights.get("attend_and_excite"):
        warnings.append("refinement thresholds are Attend-and-Excite's (refine until its loss <= 1 - threshold) "
                        "and the attend_and_excite loss is off: refinement is not applied")
    for name, weight in config.loss_weights.items():
        spec = L.LOSSES[name]
        if weight and len(subjects) < spec.min_subjects:
            warnings.append(f"loss '{name}' needs at least {spec.min_subjects} subjects and the prompt has "
                            f"{len(subjects)} ({', '.join(subjects.labels)}): it is skipped")
    return warnings


def input_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """c_in(sigma): the model sees x * c_in. For EPS and v-prediction c_in = 1 / sqrt(1 + sigma^2)."""
    return model_sampling.calculate_input(sigma, torch.ones_like(sigma))


class GuidanceRun:
    """Everything one sampling run needs: the model, the positive conds, the capture, the record."""

    def __init__(self, model_wrap, model_options: dict, capture: AttentionCapture, subjects: Subjects,
                 config: GuidanceConfig, record: AttentionRecord, total_steps: int):
        self.inner_model = model_wrap.inner_model
        conds = getattr(model_wrap, "conds", {}) or {}
        self.residual_ids: set[int] = set()  # ControlNet residuals of the current guided pass
        self.positive = _guided_conds(conds["positive"], self.residual_ids) if conds.get("positive") is not None else None
        self.model_options = model_options
        self.capture = capture
        self.subjects = subjects
        self.config = config
        self.record = record
        self.total_steps = total_steps
        self.step_sizes = config.step_sizes(total_steps)
        # refinement thresholds are A&E's (its loss <= 1 - threshold): without that loss nothing is refined
        self.thresholds = config.refinement_thresholds(total_steps) if config.loss_weights.get("attend_and_excite") else {}
        self.previous_masks: torch.Tensor | None = None
        self._warned_nonfinite = False

    # --- one guided forward ---
    def loss(self, x: torch.Tensor, sigma: torch.Tensor):
        """Differentiable (total [B], terms, maps) at latent x (x must require grad)."""
        capture = self.capture
        capture.begin_evaluation()
        capture.guided, capture.truncate = True, self.config.truncate_pass
        sigmas = sigma.reshape(1).expand(x.shape[0]).to(x.dtype)
        self.residual_ids.clear()
        try:
            with GuidedPassMode(self.residual_ids), recompute_feedforward(self.inner_model.diffusion_model,
                                                                            self.config.recompute_feedforward):
                comfy.samplers.calc_cond_batch(self.inner_model, [self.positive], x, sigmas, self.model_options)
        except TruncatedPass:
            pass
        finally:
            capture.guided = capture.truncate = False
            self.residual_ids.clear()
        aggregated = capture.aggregated()
        capture.begin_evaluation()
        if aggregated is None:
            raise RuntimeError("the guided pass recorded no cross-attention of the positive prompt")
        maps = L.subject_attention_maps(aggregated.float(), self.subjects, self.record.resolution,
                                        self.config.temperature, self.config.exclude_padding)
        total, terms = L.combined_loss(maps, self.config.loss_weights, self.previous_masks, self.config.smoothing_sigma)
        return total, terms, maps

    def update(self, x: torch.Tensor, total: torch.Tensor, sigma: torch.Tensor, step_size: float,
               active: torch.Tensor | None = None) -> torch.Tensor:
        """z <- z - alpha * dL/dz in the reference's latent z = c_in x, i.e. x <- x - alpha * dL/dx / c_in^2."""
        grad = torch.autograd.grad(total.sum(), [x])[0]
        finite = torch.isfinite(grad).flatten(1).all(dim=1)
        if not bool(finite.all()):
            if not self._warned_nonfinite:
                log.warning("attention guidance: non-finite gradient at sigma %.4f; the update is skipped for "
                            "the affected image(s) (further occurrences are not reported)", float(sigma))
                self._warned_nonfinite = True
            grad = torch.where(finite.view(-1, *[1] * (grad.ndim - 1)), grad, torch.zeros_like(grad))
        c_in = input_scale(self.inner_model.model_sampling, sigma.float().reshape(1))
        delta = step_size * grad / (c_in.to(grad) ** 2)
        if active is not None:
            delta = delta * active.view(-1, *[1] * (grad.ndim - 1)).to(delta)
        return (x - delta).detach()

    def guide(self, x: torch.Tensor, step: int, sigma: torch.Tensor) -> torch.Tensor:
        """The latent change before step `step` (Attend-and-Excite's per-step loop, batched per image)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        config = self.config
        step_size = float(self.step_sizes[step])
        with torch.inference_mode(False), torch.enable_grad():
            latent = x.detach().clone().requires_grad_(True)
            total, terms, maps = self.loss(latent, sigma)
            entry = StepLoss(step, float(sigma), {k: v.tolist() for k, v in terms.items()}, total.tolist())
            threshold = self.thresholds.get(step)
            if threshold is not None:
                running = _excite(terms) > 1.0 - threshold
                if bool(running.any()):
                    latent, total, maps = self._refine(latent, total, running, sigma, step_size, 1.0 - threshold,
                                                       entry)
            latent = self.update(latent, total, sigma, step_size)
            if config.loss_weights.get("retention", 0):
                self.previous_masks = L.retention_mask(maps.detach(), config.retention_threshold, config.smoothing_sigma)
        self.record.losses.append(entry)
        return latent.to(x.dtype)

    def _refine(self, latent, total, running, sigma, step_size, target, entry):
        """The reference's iterative refinement, batched: each image whose Attend-and-Excite loss is above
        `target` (`running`) repeats forward-loss-step (the update happens before its loss is compared, as in the reference)
        until that loss is at most `target` or max_refinement_steps updates are done; then one more forward,
        whose loss drives the step's regular update. Images at or below target are left as they are. The steps
        follow the combined loss; the stopping test is A&E's own (other terms have no such scale)."""
        for iteration in range(self.config.max_refinement_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if iteration > 0:  # the first iteration's forward is the one guide() already made
                total, terms, _maps = self.loss(latent, sigma)
                entry.refinement.append(total.tolist())
            latent = self.update(latent, total, sigma, step_size, running).requires_grad_(True)
            if iteration > 0:  # `running` arrives compared with the first forward's loss
                running = running & (_excite(terms) > target)
            if not bool(running.any()):
                break
        latent = latent.detach().requires_grad_(True)
        total, _terms, maps = self.loss(latent, sigma)
        entry.refinement.append(total.tolist())
        return latent, total, maps


def _excite(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """What refinement thresholds are compared with: the unweighted Attend-and-Excite loss, 1 - the weakest
    subject's peak attention (A&E's definition); the other terms have no such scale."""
    return terms["attend_and_excite"].detach()


class _ConstantControl:
    """A ControlNet (or chain) whose residuals act in the guided pass but are constants for the gradient.

    The guidance differentiates through the UNet only: the ControlNet's backward is not needed for the
    attention maps' gradient, would cost a second network's backward, and ComfyUI's control code scales its
    outputs in place, which autograd cannot differentiate through.
    """

    def __init__(self, control, residual_ids: set[int]):
        self.inner = control
        self.residual_ids = residual_ids

    def get_control(self, *args, **kwargs):
        with torch.no_grad():
            out = self.inner.get_control(*args, **kwargs)
        for residuals in (out or {}).values():
            self.residual_ids.update(id(r) for r in residuals if r is not None)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _guided_conds(conds: list[dict], residual_ids: set[int]) -> list[dict]:
    return [{**c, "control": _ConstantControl(c["control"], residual_ids)} if c.get("control") is not None else c
            for c in conds]


class _RecordingModel:
    """Wraps the sampler's denoiser: marks evaluation boundaries and keeps each step's first maps."""

    def __init__(self, inner, capture: AttentionCapture, record: AttentionRecord, sigmas: torch.Tensor):
        self.inner = inner
        self.capture = capture
        self.record = record
        self.sigmas = sigmas
        self.step = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, sigma, *args, **kwargs):
        want = self.capture.recording and (not self.record.steps or self.record.steps[-1] != self.step)
        if want:
            self.capture.begin_evaluation()
        out = self.inner(x, sigma, *args, **kwargs)
        if want:
            maps = self.capture.aggregated()
            if maps is not None:
                self.record.add_maps(self.step, float(self.sigmas[self.step]), maps)
            self.capture.begin_evaluation()
        return out


class AttentionSampler(comfy.samplers.KSAMPLER):
    """A SAMPLER that records subject attention and, if configured, guides the latent."""

    def __init__(self, inner: comfy.samplers.KSAMPLER, subjects: Subjects, config: GuidanceConfig | None = None,
                 attention_resolution: int = 0, record_maps: bool = True):
        super().__init__(inner.sampler_function, inner.extra_options, inner.inpaint_options)
        self.subjects = subjects
        self.config = config or GuidanceConfig(loss_weights={})
        self.attention_resolution = attention_resolution
        self.record_maps = record_maps
        self.last_record: AttentionRecord | None = None
        self.warnings = validate_config(self.config, subjects)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        diffusion_model = model_wrap.inner_model.diffusion_model
        layers, resolution = select_layers(diffusion_model, noise.shape, self.attention_resolution)
        _check_tokens(self.subjects, model_wrap)
        for warning in self.warnings:
            log.warning("attention guidance: %s", warning)
        capture = AttentionCapture(layers, resolution)
        extra_args = dict(extra_args)
        # the guided passes always read maps; the sampler's own passes only when maps are recorded, so that
        # unguided steps cost what plain sampling costs
        captured_options = capture.install(extra_args["model_options"])
        if self.record_maps:
            extra_args["model_options"] = captured_options
        total_steps = len(sigmas) - 1
        record = AttentionRecord(self.subjects, resolution, total_steps=total_steps)
        self.last_record = record

        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        if self.inpaint_options.get("random", False):
            generator = torch.manual_seed(extra_args.get("seed", 41) + 1)
            model_k.noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(noise.device)
        else:
            model_k.noise = noise
        model_sampling = model_wrap.inner_model.model_sampling
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))

        recorder = _RecordingModel(model_k, capture, record, sigmas) if self.record_maps else model_k
        capture.recording = self.record_maps
        guided = [i for i in self.config.guided_steps(total_steps) if i < total_steps] if self.config.enabled else []
        run = GuidanceRun(model_wrap, captured_options, capture, self.subjects, self.config, record,
                          total_steps) if guided else None
        if run is not None and run.positive is None:
            raise ValueError("the guider has no 'positive' conditioning to guide (use CFGGuider or BasicGuider)")

        seed = extra_args.get("seed")
        # segments: one step per guided step, then the rest of the schedule in one run of the sampler
        bounds = sorted(set(guided + [i + 1 for i in guided] + [0, total_steps]))
        for segment, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if run is not None and start in guided:
                x = run.guide(x, start, sigmas[start])
            if self.record_maps:
                recorder.step = start
            seg_args = dict(extra_args)
            if seed is not None and segment > 0:
                seg_args["seed"] = seed + segment

            def seg_callback(info, offset=start):
                if self.record_maps:
                    recorder.step = offset + info["i"] + 1
                if callback is not None:
                    callback(offset + info["i"], info["denoised"], info["x"], total_steps)

            x = self.sampler_function(recorder, x, sigmas[start:end + 1], extra_args=seg_args, callback=seg_callback,
                                      disable=disable_pbar, **self.extra_options)
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)


def _check_tokens(subjects: Subjects, model_wrap) -> None:
    conds = getattr(model_wrap, "conds", {}) or {}
    for cond in conds.get("positive", []) or []:
        cross = cond.get("model_conds", {}).get("c_crossattn")
        tokens = getattr(cross, "cond", None)
        if tokens is None:
            continue
        largest = max(p for s in subjects.subjects for p in s.token_positions)
        if tokens.shape[1] <= largest:
            raise ValueError(f"subject token position {largest} is beyond the positive conditioning's "
                             f"{tokens.shape[1]} tokens: connect the CONDITIONING and SUBJECTS of the same "
                             "Attention Text Encode node")
        return
