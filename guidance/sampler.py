"""The guided sampling loop: the one place that knows ComfyUI's sampler, sigmas and latent scaling.

`AttentionSampler` is a `KSAMPLER` wrapping any built-in sampler, run once over the whole schedule, with or
without guidance. Its model is wrapped: the model call that begins a guided step (found by a dry run of the
sampler, `plan_steps`) first moves the sampler's own latent in place (Attend-and-Excite / A-STAR), so
multistep samplers keep their history and ancestral/SDE samplers their noise stream; with a step size of 0
the result is the unguided sampler's, bit for bit. The guided pass reads the cond the SUBJECTS were encoded
to (`bind_subjects`), wherever it sits in the positive.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

import comfy.model_management
import comfy.samplers

from ..attention_patch import dit
from ..attention_patch.capture import AttentionCapture, TruncatedPass
from ..attention_patch.families import select_capture
from ..attention_patch.record import AttentionRecord, StepLoss
from ..text.subjects import Subjects, find_run, token_digests
from . import losses as L
from . import initno
from .cast_weights import per_call_weights
from .initno import InitNOConfig
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
    # guided pass: recompute in the backward instead of storing (None: the model family's default, see
    # Family.recompute_*): the feed-forward activations; the host attention's (DiT)
    recompute_feedforward: bool | None = None
    recompute_attention: bool | None = None
    retention_mask_method: str = "half_max"  # A-STAR's retention region: "half_max" or "otsu"
    recast_weights: bool = True  # guided pass: per-call weights made again in the backward (off: autograd keeps them)

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
    if config.retention_mask_method not in ("half_max", "otsu"):
        raise ValueError(f"retention mask method {config.retention_mask_method!r}; valid: half_max, otsu")
    for name, weight in config.loss_weights.items():
        spec = L.LOSSES[name]
        if weight and len(subjects) < spec.min_subjects:
            warnings.append(f"loss '{name}' needs at least {spec.min_subjects} subjects and the prompt has "
                            f"{len(subjects)} ({', '.join(subjects.labels)}): it is skipped")
        elif weight and spec.needs_attributes and not subjects.attributes:
            warnings.append(f"loss '{name}' binds attributes to their nouns and no subject has one (write subject "
                            "groups, e.g. 'red car, blue bench': the last word is the noun): it is skipped")
    if config.enabled and not active_losses(config, subjects):
        warnings.append("every weighted loss is skipped for these subjects: nothing is guided")
    return warnings


def active_losses(config: GuidanceConfig, subjects: Subjects) -> list[str]:
    """The weighted losses that apply to these subjects (enough subjects; attributes where a loss binds them)."""
    return [name for name, weight in config.loss_weights.items()
            if weight and len(subjects) >= L.LOSSES[name].min_subjects
            and (subjects.attributes or not L.LOSSES[name].needs_attributes)]


def input_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """c_in(sigma): the model sees x * c_in. For EPS and v-prediction c_in = 1 / sqrt(1 + sigma^2)."""
    return model_sampling.calculate_input(sigma, torch.ones_like(sigma))


class GuidanceRun:
    """Everything one sampling run needs: the model, the subjects' cond, the capture, the record."""

    def __init__(self, model_k, model_options: dict, capture: AttentionCapture, binding: "SubjectBinding",
                 config: GuidanceConfig, record: AttentionRecord, total_steps: int):
        self.model_k = model_k
        self.inner_model = model_k.inner_model.inner_model
        self.residual_ids: set[int] = set()  # ControlNet residuals of the current guided pass
        self.binding = binding
        self.cond = _guided_conds([binding.cond], self.residual_ids)[0]
        self.model_options = model_options
        self.capture = capture
        self.subjects = binding.subjects
        self.config = config
        self.record = record
        self.total_steps = total_steps
        self.step_sizes = config.step_sizes(total_steps)
        # refinement thresholds are A&E's (its loss <= 1 - threshold): without that loss nothing is refined
        self.thresholds = config.refinement_thresholds(total_steps) if config.loss_weights.get("attend_and_excite") else {}
        self.previous_masks: torch.Tensor | None = None
        self.previous_token_maps: tuple | None = None  # CONFORM: the last guided step's noun and attribute maps
        self.progress = 0.0  # the guided step as a fraction of the schedule (step / steps)
        self._last_token_maps: tuple | None = None
        self._warned_nonfinite = False
        # attribute, noun and other-token maps only when a weighted loss reads them
        self.binds = bool(self.subjects.attributes) and any(
            w and L.LOSSES[n].needs_attributes for n, w in config.loss_weights.items())
        self.denoise_mask = None

    def recompute_choice(self) -> tuple[bool, bool]:
        """What a guided pass recomputes in the backward, (feed-forwards, host attention): the config's choice,
        else the model family's."""
        feedforward, attention = self.capture.recompute_defaults()
        chosen = self.config.recompute_feedforward, self.config.recompute_attention
        return (feedforward if chosen[0] is None else chosen[0]), (attention if chosen[1] is None else chosen[1])

    def model_input(self, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """What the model sees for the sampler's latent x: with an inpainting mask, the kept region is the
        noised source latent (as ComfyUI's KSamplerX0Inpaint does), so only the masked region is guided."""
        mask = self.denoise_mask
        if mask is None:
            return x
        if "denoise_mask_function" in self.model_options:
            mask = self.model_options["denoise_mask_function"](
                sigmas, mask, extra_options={"model": self.model_k.inner_model, "sigmas": self.model_k.sigmas})
        kept = self.inner_model.scale_latent_inpaint(x=x, sigma=sigmas, noise=self.model_k.noise,
                                                     latent_image=self.model_k.latent_image, denoise_mask=mask)
        return x * mask + kept * (1.0 - mask)

    # --- one guided forward ---
    def forward_maps(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Differentiable aggregated maps of the subjects' text at latent x: [B, H*W, T] (x must require grad)."""
        capture = self.capture
        capture.begin_evaluation()
        capture.guided, capture.truncate = True, self.config.truncate_pass
        recompute_ff, capture.recompute_attention = self.recompute_choice()
        sigmas = sigma.reshape(-1)[:1].expand(x.shape[0]).to(x.dtype)
        self.residual_ids.clear()
        try:
            diffusion_model = self.inner_model.diffusion_model
            with GuidedPassMode(self.residual_ids), recompute_feedforward(
                    diffusion_model, recompute_ff, capture.feedforwards(diffusion_model)):
                # only the subjects' cond: its maps are the ones guided, wherever it sits in the positive
                comfy.samplers.calc_cond_batch(self.inner_model, [[self.cond]], self.model_input(x, sigmas), sigmas,
                                               self.model_options)
        except TruncatedPass:
            pass
        finally:
            capture.guided = capture.truncate = capture.recompute_attention = False
            self.residual_ids.clear()
        aggregated = capture.aggregated()
        capture.begin_evaluation()
        if aggregated is None:
            raise RuntimeError("the guided pass recorded no cross-attention of the subjects' prompt")
        return self.binding.own_tokens(aggregated).float()

    def loss(self, x: torch.Tensor, sigma: torch.Tensor):
        """Differentiable (total [B], terms, maps) at latent x (x must require grad)."""
        capture = self.capture
        own = self.forward_maps(x, sigma)
        maps = L.subject_attention_maps(own, self.subjects, capture.grid, self.config.temperature,
                                        self.config.exclude_padding)
        context = L.binding_context(own, self.subjects, capture.grid, self.config.temperature,
                                    self.config.exclude_padding) if self.binds else {}
        if self.binds:
            context["previous_token_maps"] = self.previous_token_maps
            context["progress"] = self.progress  # Divide & Bind's binding coefficient rises with it
            self._last_token_maps = (maps.detach(), context["attribute_maps"].detach())
        total, terms = L.combined_loss(maps, self.config.loss_weights, self.previous_masks, self.config.smoothing_sigma,
                                       **context)
        return total, terms, maps

    def update(self, x: torch.Tensor, total: torch.Tensor, sigma: torch.Tensor, step_size: float,
               active: torch.Tensor | None = None) -> torch.Tensor:
        """z <- z - alpha * dL/dz in the reference's latent z = c_in x, i.e. x <- x - alpha * dL/dx / c_in^2."""
        if not total.requires_grad:
            # the loss does not depend on the latent at this step (retention alone at its first step: no
            # previous masks yet): dL/dz = 0, nothing to step
            return x.detach()
        grad = torch.autograd.grad(total.sum(), [x])[0]
        finite = torch.isfinite(grad).flatten(1).all(dim=1)
        if not bool(finite.all()):
            if not self._warned_nonfinite:
                log.warning("attention guidance: non-finite gradient at sigma %.4f; the update is skipped for "
                            "the affected image(s) (further occurrences are not reported)", float(sigma))
                self._warned_nonfinite = True
            grad = torch.where(finite.view(-1, *[1] * (grad.ndim - 1)), grad, torch.zeros_like(grad))
        c_in = input_scale(self.inner_model.model_sampling, sigma.float().reshape(-1)[:1])
        delta = step_size * grad / (c_in.to(grad) ** 2)
        if active is not None:
            delta = delta * active.view(-1, *[1] * (grad.ndim - 1)).to(delta)
        return (x - delta).detach()

    def guide(self, x: torch.Tensor, step: int, sigma: torch.Tensor, denoise_mask=None) -> torch.Tensor:
        """The latent change before step `step` (Attend-and-Excite's per-step loop, batched per image)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.denoise_mask = denoise_mask
        self.progress = step / max(self.total_steps, 1)
        config = self.config
        step_size = float(self.step_sizes[step])
        # per_call_weights spans forwards and backwards: cast layers make their weight again in the backward
        with torch.inference_mode(False), torch.enable_grad(), dit.differentiable_host(), \
                per_call_weights(self.inner_model.diffusion_model, config.recast_weights):
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
                self.previous_masks = L.retention_mask(maps.detach(), config.retention_threshold,
                                                       config.smoothing_sigma, config.retention_mask_method)
            if config.loss_weights.get("conform", 0) and self.binds:
                # CONFORM's previous maps: those of the forward whose loss drove this update
                self.previous_token_maps = self._last_token_maps
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


@dataclass(frozen=True)
class SubjectBinding:
    """The positive cond the SUBJECTS were encoded to, and where the subjects' tokens sit in it."""
    subjects: Subjects
    cond: dict
    token_offset: int  # the subjects' text starts at token `token_offset` of the cond (ConditioningConcat)

    def own_tokens(self, aggregated: torch.Tensor) -> torch.Tensor:
        """[B, N, T_cond] -> [B, N, T_subjects]: the subjects' own text's tokens, as their positions count them."""
        start = self.token_offset
        return aggregated[:, :, start:start + self.subjects.num_tokens]

    def area(self, latent_shape) -> tuple[float, float, float, float] | None:
        """The cond's area as (top, left, height, width) fractions of the latent, None for the whole image."""
        area = self.cond.get("area")
        if area is None or len(area) < 4 or isinstance(area[0], str):
            return None
        height, width = int(latent_shape[-2]), int(latent_shape[-1])
        h, w, y, x = (int(v) for v in area[:4])
        h, w = min(height - y, h), min(width - x, w)  # as ComfyUI clamps it
        if (h, w, y, x) == (height, width, 0, 0):
            return None
        return (y / height, x / width, h / height, w / width)

    def active(self, sigma: float) -> bool:
        """Whether the cond takes part at sigma (ConditioningSetTimestepRange), as ComfyUI decides it."""
        start, end = self.cond.get("timestep_start"), self.cond.get("timestep_end")
        return not ((start is not None and sigma > float(start)) or (end is not None and sigma < float(end)))


def _cross_attention(cond: dict):
    return getattr(cond.get("model_conds", {}).get("c_crossattn"), "cond", None)


def bind_subjects(subjects: Subjects, conds: dict) -> SubjectBinding:
    """Finds the positive cond that SUBJECTS were made with (by its embedding's chunk digests).

    Raises a clear error when no positive cond matches: SUBJECTS of another Attention Text Encode node, or
    of the negative prompt, would guide the token positions of a different text."""
    positive = conds.get("positive") or []
    if not positive:
        raise ValueError("the guider has no 'positive' conditioning (use CFGGuider, BasicGuider, DualCFGGuider or "
                         "KSampler's positive input)")
    if not subjects.fingerprints:  # SUBJECTS built outside Attention Text Encode: only one cond is unambiguous
        with_tokens = [c for c in positive if _cross_attention(c) is not None]
        if len(with_tokens) != 1:
            raise ValueError("these SUBJECTS carry no fingerprint of their text and the positive holds "
                             f"{len(with_tokens)} conds: connect the SUBJECTS of the Attention Text Encode node "
                             "whose CONDITIONING is in the positive")
        return SubjectBinding(subjects, with_tokens[0], 0)
    for cond in positive:
        tokens = _cross_attention(cond)
        if tokens is None:
            continue
        digests = token_digests(tokens)
        for fingerprint in subjects.fingerprints:
            start = find_run(digests, fingerprint)
            if start is not None:
                return SubjectBinding(subjects, cond, start)
    where = "the negative prompt's" if any(
        _matches(subjects, c) for c in conds.get("negative") or []) else "no positive cond's"
    raise ValueError(f"the SUBJECTS ({', '.join(subjects.labels)}; prompt '{subjects.prompt[:60]}') match "
                     f"{where} text: connect the SUBJECTS of the Attention Text Encode node whose CONDITIONING "
                     "feeds the positive (directly or through Conditioning Combine/Concat/Set Area/Set Timestep "
                     "Range)")


def _matches(subjects: Subjects, cond: dict) -> bool:
    tokens = _cross_attention(cond)
    if tokens is None:
        return False
    digests = token_digests(tokens)
    return any(find_run(digests, f) is not None for f in subjects.fingerprints)


@dataclass
class StepPlan:
    """Which of the sampler's model calls begin a step, learned from a dry run of the sampler.

    Samplers call the model several times per step (heun's correction at the next sigma, the stages of
    dpmpp_sde, sa_solver_pece's second evaluation...), so neither "one call per step" nor "the first call at
    sigma_i" holds. The dry run replaces the model by a cheap stand-in and watches the sampler's callbacks: the
    call that begins step i is the one in the window before callback(i) whose input is the state the callback
    reports (else the window's last call, for samplers that hand the model a rescaled copy: uni_pc).
    Adaptive samplers (dpm_adaptive) change their calls with the model's values: then the first call after
    each callback begins a step, decided while sampling."""
    first_calls: dict[int, int] = field(default_factory=dict)  # model call index -> sampler step index
    online: bool = False


def plan_steps(sampler_function, model_k, x, sigmas, extra_args, extra_options) -> StepPlan:
    def dry_run(scale):
        calls, events = [], []
        stand_in = _StandInModel(model_k, calls, scale)

        def callback(info):
            events.append((int(info["i"]), info["x"], len(calls)))
        args = dict(extra_args)
        args["model_options"] = dict(args.get("model_options") or {})
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the stand-in run must not move the real run's RNG
            sampler_function(stand_in, x.clone(), sigmas, extra_args=args, callback=callback, disable=True,
                             **extra_options)
        return calls, events

    try:
        calls, events = dry_run(0.5)
        calls_again, _ = dry_run(0.25)
    except Exception as error:  # noqa: BLE001 - a sampler the stand-in cannot drive: decide while sampling
        log.debug("attention guidance: dry run of the sampler failed (%s); steps are found while sampling", error)
        return StepPlan(online=True)
    if [s for _x, s in calls] != [s for _x, s in calls_again]:
        return StepPlan(online=True)
    plan = StepPlan()
    previous = 0
    for step, state, count in events:
        window = range(previous, count)
        if len(window):
            same = [k for k in window if calls[k][0] is state]
            plan.first_calls[same[0] if same else window[-1]] = step
        previous = count
    return plan


class _StandInModel:
    """The sampler's model for the dry run: denoised = scale * x, the post-CFG hooks fed as CFG would."""

    def __init__(self, inner, calls: list, scale: float):
        self.inner, self.calls, self.scale = inner, calls, scale

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, sigma, model_options=None, **kwargs):
        self.calls.append((x, float(sigma.reshape(-1)[0])))
        out = x * self.scale
        for function in (model_options or {}).get("sampler_post_cfg_function", []):
            out = function({"denoised": out, "cond": None, "uncond": None, "cond_scale": 1.0, "model": self.inner,
                            "uncond_denoised": out, "cond_denoised": out, "sigma": sigma,
                            "model_options": model_options, "input": x})
        return out


def schedule_step(sigmas: torch.Tensor, sigma: float) -> int:
    """The schedule step i with sigmas[i] >= sigma > sigmas[i+1] (sigma on the schedule: that step)."""
    values = sigmas.tolist()
    for i in range(len(values) - 1):
        if sigma >= values[i + 1] and (sigma > values[i + 1] or values[i] == values[i + 1]) \
                and sigma <= values[i] * (1 + 1e-6) + 1e-12:
            return i
    return 0 if sigma > values[0] else len(values) - 2


class _GuidedModel:
    """The sampler's model, run once over the whole schedule: at the call that begins a guided step it moves
    the sampler's latent (in place, so every sampler keeps its history and noise stream) and records maps."""

    def __init__(self, inner, sigmas, plan: StepPlan, capture: AttentionCapture, record: AttentionRecord | None,
                 run: GuidanceRun | None, guided: set[int], binding: SubjectBinding, state_scale=None):
        self.inner, self.sigmas, self.plan = inner, sigmas, plan
        self.capture, self.record, self.run, self.guided = capture, record, run, guided
        self.binding = binding
        self.state_scale = state_scale  # for samplers that give the model a rescaled copy of their state
        self.calls = 0
        self.after_callback = True
        self.step = -1
        self.pending: torch.Tensor | None = None
        self.guided_done: set[int] = set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, sigma, denoise_mask=None, **kwargs):
        call, self.calls = self.calls, self.calls + 1
        begins = self.after_callback if self.plan.online else call in self.plan.first_calls
        self.after_callback = False
        if not begins:
            return self.inner(x, sigma, denoise_mask=denoise_mask, **kwargs)
        self.step = self.plan.first_calls.get(call, self.step + 1) if not self.plan.online else self.step + 1
        value = float(sigma.reshape(-1)[0])
        index = schedule_step(self.sigmas, value)
        delta = None
        if self.run is not None and index in self.guided and index not in self.guided_done:
            self.guided_done.add(index)
            if self.binding.active(value):  # (inactive guided steps were reported before sampling)
                guided = self.run.guide(x, index, sigma.reshape(-1)[0], denoise_mask)
                delta = guided - x
                x.copy_(guided)  # the sampler's own latent: its next computations start from the guided one
        recording = self.record is not None
        if recording:
            self.capture.begin_evaluation()
        out = self.inner(x, sigma, denoise_mask=denoise_mask, **kwargs)
        if recording:
            maps = self.capture.aggregated()
            if maps is not None:
                self.record.add_maps(self.step, value, self.binding.own_tokens(maps), resolution=self.capture.grid,
                                     area=self.binding.area(x.shape))
            self.capture.begin_evaluation()
        if delta is not None and self.state_scale is not None:
            # the input was a rescaled copy: keep the model's output consistent with the sampler's unmoved
            # state and move that state when the step reports it (callback)
            out = out + delta
            self.pending = delta * self.state_scale(value)
        return out

    def on_callback(self, info: dict) -> None:
        self.after_callback = True
        if self.pending is not None:
            info["x"].add_(self.pending.to(info["x"]))
            self.pending = None


def _rescaled_state(sampler_function):
    """The factor from the model's input to the sampler's state, for samplers whose state is not the latent
    the model sees: ComfyUI's UniPC works on x / sqrt(1 + sigma^2) (variance-preserving scaling)."""
    from comfy.extra_samplers import uni_pc
    if sampler_function in (uni_pc.sample_unipc, uni_pc.sample_unipc_bh2):
        return lambda sigma: 1.0 / math.sqrt(1.0 + sigma ** 2)
    return None


class AttentionSampler(comfy.samplers.KSAMPLER):
    """A SAMPLER that records subject attention and, if configured, guides the latent."""

    def __init__(self, inner: comfy.samplers.KSAMPLER, subjects: Subjects, config: GuidanceConfig | None = None,
                 attention_resolution: int = 0, record_maps: bool = True, initno: InitNOConfig | None = None,
                 blocks: str = ""):
        super().__init__(inner.sampler_function, inner.extra_options, inner.inpaint_options)
        self.subjects = subjects
        self.initno = initno
        self.config = config or GuidanceConfig(loss_weights={})
        self.attention_resolution = attention_resolution
        self.blocks = blocks  # DiT models: which joint-attention blocks are read ('' = the family's default)
        self.record_maps = record_maps
        self.last_record: AttentionRecord | None = None
        self.warnings = validate_config(self.config, subjects)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        diffusion_model = model_wrap.inner_model.diffusion_model
        layout = select_capture(diffusion_model, noise.shape, self.attention_resolution, self.blocks)
        layers, resolution = layout.units, layout.resolution
        binding = bind_subjects(self.subjects, getattr(model_wrap, "conds", {}) or {})
        _check_tokens(binding)
        for warning in self.warnings:
            log.warning("attention guidance: %s", warning)
        capture = AttentionCapture.for_layout(layout, binding.cond.get("uuid"))
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
        if self.initno is not None:  # a better start: only the noise changes
            noise = self._initno(model_k, captured_options, layers, capture, binding, record, sigmas, noise,
                                 latent_image, extra_args.get("seed") or 0, self.max_denoise(model_wrap, sigmas))
            if not self.inpaint_options.get("random", False):
                model_k.noise = noise
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))

        capture.recording = self.record_maps
        enabled = self.config.enabled and bool(active_losses(self.config, self.subjects))
        guided = [i for i in self.config.guided_steps(total_steps) if i < total_steps] if enabled else []
        if enabled and not guided:
            log.warning("attention guidance: the guided range [%s, %s) covers no step of the %d-step schedule: "
                        "nothing is guided", self.config.guidance_start, self.config.guidance_end, total_steps)
        inactive = [i for i in guided if not binding.active(float(sigmas[i]))]
        if inactive:
            log.warning("attention guidance: the subjects' prompt is not active at guided step(s) %s (its "
                        "timestep range): those steps are not guided", inactive)
        run = GuidanceRun(model_k, captured_options, capture, binding, self.config, record, total_steps) \
            if guided else None
        needs_steps = self.record_maps or run is not None
        plan = plan_steps(self.sampler_function, model_k, x, sigmas, extra_args, self.extra_options) \
            if needs_steps else StepPlan()
        model = _GuidedModel(model_k, sigmas, plan, capture, record if self.record_maps else None, run, set(guided),
                             binding, _rescaled_state(self.sampler_function)) if needs_steps else model_k

        def step_callback(info):
            if needs_steps:
                model.on_callback(info)
            if callback is not None:
                callback(info["i"], info["denoised"], info["x"], total_steps)

        x = self.sampler_function(model, x, sigmas, extra_args=extra_args, callback=step_callback,
                                  disable=disable_pbar, **self.extra_options)
        return model_sampling.inverse_noise_scaling(sigmas[-1], x)


    def _initno(self, model_k, captured_options, layers, capture, binding, record, sigmas, noise, latent_image,
                seed, max_denoise) -> torch.Tensor:
        """InitNO's stage (guidance/initno.py): the initial noise optimised on one conditional pass at sigma_0.

        Its conflict score reads self-attention: on UNets the attn1 layers of the captured resolution; on DiT
        models the image->image part of the captured blocks' joint attention, re-normalised over the image."""
        config = self.config
        if capture.family_impl is None:
            self_capture = initno.SelfAttentionCapture(layers, binding.cond.get("uuid"))
            options, take_self = self_capture.install(captured_options), self_capture.take
        else:
            options, take_self = captured_options, capture.take_self_attention
        stage = GuidanceRun(model_k, options, capture, binding, config, record, len(sigmas) - 1)
        model_sampling = model_k.inner_model.inner_model.model_sampling

        def scores(z):
            x = model_sampling.noise_scaling(sigma_0, z, latent, max_denoise)
            maps = L.subject_attention_maps(stage.forward_maps(x, sigma_0), binding.subjects, capture.grid,
                                            config.temperature, config.exclude_padding)
            self_maps = take_self()
            conflict = initno.conflict_score(self_maps, maps, config.smoothing_sigma) if self_maps is not None \
                else maps.new_zeros(maps.shape[0])
            return initno.response_score(maps, config.smoothing_sigma), conflict

        def fresh_noise(round_index):
            generator = torch.Generator().manual_seed(int(seed) + round_index)
            return torch.randn(noise.shape, generator=generator).to(noise)

        capture.want_self_attention = True
        try:
            with torch.inference_mode(False), torch.enable_grad(), dit.differentiable_host(), \
                    per_call_weights(stage.inner_model.diffusion_model):
                # the host made sigmas and the latent under inference mode: autograd cannot save inference tensors
                # (flow models' noise scaling multiplies the noise by sigma itself), so take normal copies
                sigma_0, latent = sigmas[0].clone(), latent_image.clone()
                result = initno.optimise_noise(scores, noise.detach().clone(), fresh_noise, self.initno)
        finally:
            capture.want_self_attention = False
        record.initno = result.record()
        log.info("attention guidance: InitNO succeeded for %d of %d images (worst kept response %.3f, conflict %.3f; "
                 "%d passes)", sum(record.initno["succeeded"]), len(result.images), max(record.initno["response"]),
                 max(record.initno["conflict"]), len(result.history))
        return result.noise.to(noise)


def _check_tokens(binding: SubjectBinding) -> None:
    tokens = _cross_attention(binding.cond)
    if tokens is None:
        return
    available = tokens.shape[1] - binding.token_offset
    largest = max(p for s in binding.subjects.subjects for p in s.token_positions)
    if available <= largest:
        raise ValueError(f"subject token position {largest} is beyond the positive conditioning's "
                         f"{available} tokens: connect the CONDITIONING and SUBJECTS of the same "
                         "Attention Text Encode node")
