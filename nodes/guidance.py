"""Attention Guidance: picks the losses, their weights and the shared step schedule."""
from comfy_api.latest import io

from ..guidance.losses import LOSSES
from ..guidance.sampler import DEFAULT_REFINEMENT, GuidanceConfig
from .types import ADVANCED, Guidance

_DEFAULT_WEIGHTS = {"attend_and_excite": 1.0}
# The node's first losses keep their place among the inputs; losses added since come after every other input,
# optional with weight 0, so that saved workflows (whose widget values are stored by position) keep working.
_FIRST_LOSSES = ("attend_and_excite", "segregation", "retention", "attendance")
_TIPS = {
    "attend_and_excite": "Attend-and-Excite: raise the weakest subject's peak attention. Paper: 1.0 (alone).",
    "segregation": "A-STAR segregation: subjects should not share pixels. Needs 2+ subjects. A-STAR: 1.0.",
    "retention": "A-STAR retention: each subject keeps the region it held at the previous step. A-STAR: 1.0.",
    "attendance": "Divide & Bind attendance: maximise the weakest subject's total variation. D&B: 1.0.",
    "divide_and_bind_binding": "Divide & Bind binding: each attribute's map matches its noun's (Jensen-Shannon). "
                               "Needs subject groups such as 'red car, blue bench'. D&B: 1.0 with attendance.",
    "syngen": "SynGen: pull each attribute's map to its noun's, push both from the other tokens' (symmetric KL). "
              "Needs subject groups such as 'red car, blue bench'.",
    "conform": "CONFORM: contrastive over maps, a noun and its attributes together, other groups apart "
               "(InfoNCE, temperature 0.5). Needs 2+ subjects, one with an attribute.",
}


# recompute_feedforward: (feed-forwards, host attention) to recompute, None = the family's choice. It was a
# boolean before DiT models came: a saved True (the default) is "auto", False is "off".
RECOMPUTE = {"auto": (None, None), "on": (True, True), "off": (False, False)}
_LEGACY_RECOMPUTE = {True: "auto", False: "off"}


def recompute_choice(value) -> tuple[bool | None, bool | None]:
    if isinstance(value, bool):
        value = _LEGACY_RECOMPUTE[value]
    if value not in RECOMPUTE:
        raise ValueError(f"recompute_feedforward {value!r} is not one of {', '.join(RECOMPUTE)} (or true/false, "
                         "as workflows saved before DiT support hold it)")
    return RECOMPUTE[value]


def parse_refinement(text: str) -> tuple[tuple[float, float], ...]:
    """'0.0:0.05, 0.2:0.5' -> ((0.0, 0.05), (0.2, 0.5)); an empty string turns refinement off."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            fraction, threshold = (float(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"refinement entry {part!r} is not 'step_fraction:threshold' (e.g. '0.2:0.5')") from None
        if not (0.0 <= fraction <= 1.0 and 0.0 <= threshold <= 1.0):
            raise ValueError(f"refinement entry {part!r}: step fraction and threshold must both lie in [0, 1]")
        pairs.append((fraction, threshold))
    return tuple(pairs)


class AttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        def weight(name, spec, **options):
            return io.Float.Input(f"{name}_weight", default=_DEFAULT_WEIGHTS.get(name, 0.0), min=0.0, max=100.0,
                                  step=0.05, tooltip=_TIPS.get(name, spec.description), **options)
        weights = [weight(name, LOSSES[name]) for name in _FIRST_LOSSES]
        later = [weight(name, spec, optional=True) for name, spec in LOSSES.items() if name not in _FIRST_LOSSES]
        refinement = ", ".join(f"{f}:{t}" for f, t in DEFAULT_REFINEMENT)
        return io.Schema(
            node_id="AttnGuideGuidance",
            display_name="Attention Guidance Losses (AttnGuide)",
            category="sampling/attention guidance",
            description="The losses the Attention samplers minimise before each guided step, and their schedule.",
            inputs=weights + [
                io.Float.Input("scale_factor", default=20.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Step size alpha_t = scale_factor * sqrt(linspace(1, 0.5)). A&E: 20."),
                io.Float.Input("guidance_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First guided step, as a fraction of the schedule."),
                io.Float.Input("guidance_end", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Guidance stops here (fraction of the schedule). A&E: 0.5 (25 of 50 steps); "
                                       "A-STAR guides across the process (e.g. 1.0)."),
                io.String.Input("refinement", default=refinement,
                                tooltip="step_fraction:threshold pairs. At those steps the latent is refined until "
                                        "A&E's loss <= 1 - threshold (needs the attend_and_excite loss). "
                                        "A&E: 0:0.05, 0.2:0.5, 0.4:0.8. Empty: off."),
                io.Int.Input("max_refinement_steps", default=20, min=0, max=100, **ADVANCED,
                             tooltip="Cap on refinement iterations per refinement step. A&E: 20."),
                io.Float.Input("softmax_temperature", default=100.0, min=1.0, max=1000.0, **ADVANCED,
                               tooltip="Attention is multiplied by this before the softmax over tokens. A&E: 100."),
                io.Boolean.Input("exclude_padding", default=False,
                                 tooltip="Softmax over the prompt's words only, not end/padding tokens. "
                                         "Recommended for SD2.x (its '!' padding); off reproduces A&E on SD1.x."),
                io.Float.Input("smoothing_sigma", default=0.5, min=0.05, max=5.0, step=0.05, **ADVANCED,
                               tooltip="Sigma of the 3x3 Gaussian smoothing of the maps. A&E: 0.5."),
                io.Float.Input("retention_threshold", default=0.5, min=0.0, max=1.0, step=0.05, **ADVANCED,
                               tooltip="Retention mask: pixels with at least this fraction of the subject's peak."),
                io.Boolean.Input("truncate_pass", default=True, **ADVANCED,
                                 tooltip="Stop the guided forward after the last captured layer (same gradient, "
                                         "less time and memory)."),
                io.Combo.Input("recompute_feedforward", options=list(RECOMPUTE), default="auto", optional=True,
                               **ADVANCED,
                               tooltip="Guided pass: recompute activations during the backward instead of storing "
                                       "them (same gradient; less memory, more time). auto = the model family's "
                                       "choice: SD1.x/SD2.x/SDXL and SD3 recompute the feed-forwards (SDXL: 0.6x "
                                       "the memory for 20% more time), SD3 also its attention; Flux stores them "
                                       "(its pass already stops before the single blocks). on = recompute the "
                                       "feed-forwards, and on SD3/Flux the attention too; off = store both."),
                *later,
                io.Combo.Input("retention_mask", options=["half_max", "otsu"], default="half_max", optional=True,
                               **ADVANCED,
                               tooltip="A-STAR's retention region (the paper gives no threshold): half_max = "
                                       "pixels with at least retention_threshold x the peak; otsu = Otsu's "
                                       "threshold of the smoothed map (as InitNO and later work)."),
            ],
            outputs=[Guidance.Output(display_name="GUIDANCE")],
        )

    @classmethod
    def validate_inputs(cls, recompute_feedforward="auto"):
        # named here, so ComfyUI leaves this input's list check to us: saved workflows hold a boolean
        try:
            recompute_choice(recompute_feedforward)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, scale_factor, guidance_start, guidance_end, refinement, max_refinement_steps,
                softmax_temperature, exclude_padding, smoothing_sigma, retention_threshold, truncate_pass,
                recompute_feedforward="auto", retention_mask="half_max", **weights) -> io.NodeOutput:
        loss_weights = {name: float(weights.get(f"{name}_weight", 0.0)) for name in LOSSES}
        if not any(loss_weights.values()):
            raise ValueError("Attention Guidance: every loss weight is 0, so nothing would be guided; set at least "
                             f"one of {', '.join(f'{n}_weight' for n in LOSSES)} above 0")
        if guidance_end <= guidance_start:
            raise ValueError(f"Attention Guidance: guidance_end ({guidance_end}) must be greater than guidance_start "
                             f"({guidance_start}); both are fractions of the sampling schedule")
        feedforward, attention = recompute_choice(recompute_feedforward)
        config = GuidanceConfig(
            loss_weights=loss_weights, scale_factor=scale_factor, guidance_start=guidance_start,
            guidance_end=guidance_end, refinement=parse_refinement(refinement),
            max_refinement_steps=max_refinement_steps, temperature=softmax_temperature,
            exclude_padding=exclude_padding, smoothing_sigma=smoothing_sigma,
            retention_threshold=retention_threshold, truncate_pass=truncate_pass,
            recompute_feedforward=feedforward, recompute_attention=attention, retention_mask_method=retention_mask)
        return io.NodeOutput(config)


NODES = [AttentionGuidance]
