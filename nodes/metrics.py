"""Attention Metrics: the numbers the guidance aims at, read from the ATTENTION record of a run.

Per image and recorded step, on the maps processed as Attend-and-Excite processes them (softmax re-weighting
with the temperature, 3x3 Gaussian smoothing; `guidance.losses`):

  peak       each subject's (noun's) peak attention, max_ij G * A_s; min_peak is the weakest subject's (A&E's
             objective: higher = every subject is attended somewhere).
  overlap    mean over subject pairs of the soft IoU sum_ij min(A_m, A_n) / sum_ij (A_m + A_n) of the smoothed
             maps (A-STAR's segregation term per pair): 0 = disjoint, 0.5 = the same map; None with one subject.

and once per image:

  retention  mean over subjects of the soft IoU of the subject's smoothed map at an early step and at the last
             step, each scaled to peak 1: 0.5 = the same shape, lower = the subject moved (A-STAR's retention aim).

The node returns them as JSON (a STRING, one object per image of the batch) and shows them on the node; through
ComfyUI's API they come back in /history as this node's UI output `attention_metrics`.
"""
from __future__ import annotations

import json
import math

import torch
from comfy_api.latest import io

from ..guidance.losses import max_attention_per_subject, smooth, subject_attention_maps
from .types import ADVANCED, AttentionMaps

_NO_MAPS = ("Attention Metrics: the ATTENTION input holds no attention maps: enable record_maps on the Attention "
            "KSampler (the Attention Sampler for SamplerCustom records no maps)")


def _soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_ij min(a, b) / sum_ij (a + b) over the last two dims."""
    return torch.minimum(a, b).flatten(-2).sum(-1) / (a + b).flatten(-2).sum(-1).clamp(min=1e-12)


def retention_step(record, retention_from: float) -> int:
    """The recorded step the retention compares with the last one: the first recorded step at or after
    retention_from x the schedule's steps (the last recorded step if none is)."""
    total = record.total_steps or len(record.steps)
    target = math.floor(retention_from * total)
    later = [step for step in record.steps if step >= target]
    return min(later) if later else record.steps[-1]


def attention_metrics(record, retention_from: float = 0.25, temperature: float = 100.0, smoothing_sigma: float = 0.5,
                      exclude_padding: bool = False) -> list[dict]:
    """The metrics of every image of `record` (see the module docstring): a list, one dict per image, with
    subjects, total_steps, steps, peak [step][subject], min_peak [step], overlap [step] (None: one subject),
    retention and retention_steps (early, last)."""
    if record is None:
        raise ValueError("Attention Metrics: no ATTENTION connected: connect the ATTENTION output of the Attention "
                         "KSampler")
    if not record.maps:
        raise ValueError(_NO_MAPS)
    labels = list(record.subjects.labels)
    count = len(labels)
    pairs = [(m, n) for m in range(count) for n in range(m + 1, count)]
    peaks, overlaps, smoothed_by_step = [], [], {}
    for index, step in enumerate(record.steps):
        maps = subject_attention_maps(record.grid_maps(index), record.subjects, record.resolution, temperature,
                                      exclude_padding)  # [B, S, H, W]
        smoothed = smooth(maps, sigma=smoothing_sigma)
        smoothed_by_step[step] = smoothed
        peaks.append(max_attention_per_subject(maps, sigma=smoothing_sigma))  # [B, S]
        overlaps.append(torch.stack([_soft_iou(smoothed[:, m], smoothed[:, n]) for m, n in pairs]).mean(dim=0)
                        if pairs else None)  # [B]

    early, last = retention_step(record, retention_from), record.steps[-1]

    def peak_normalised(maps):
        return maps / maps.flatten(2).max(dim=-1).values[..., None, None].clamp(min=1e-12)

    retention = _soft_iou(peak_normalised(smoothed_by_step[early]), peak_normalised(smoothed_by_step[last])).mean(dim=1)
    batch = peaks[0].shape[0]
    return [{
        "subjects": labels,
        "total_steps": int(record.total_steps or len(record.steps)),
        "steps": [int(s) for s in record.steps],
        "peak": [[float(v) for v in step_peaks[image]] for step_peaks in peaks],
        "min_peak": [float(step_peaks[image].min()) for step_peaks in peaks],
        "overlap": [None if o is None else float(o[image]) for o in overlaps],
        "retention": float(retention[image]),
        "retention_steps": [int(early), int(last)],
    } for image in range(batch)]


class AttentionMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttnGuideMetrics",
            display_name="Attention Metrics (AttnGuide)",
            category="sampling/attention guidance",
            description="Numbers from the recorded attention, per image and step: each subject's peak (the weakest "
                        "one's is A&E's aim), the subjects' overlap (A-STAR segregation) and retention (A-STAR). "
                        "As JSON, and in the API's /history.",
            is_output_node=True,
            inputs=[
                AttentionMaps.Input("attention", tooltip="ATTENTION from the Attention KSampler (record_maps on)."),
                io.Float.Input("retention_from", default=0.25, min=0.0, max=1.0, step=0.05,
                               tooltip="Retention compares each subject's map at this fraction of the schedule "
                                       "(the first recorded step at or after it) with its map at the last step."),
                io.Float.Input("softmax_temperature", default=100.0, min=1.0, max=1000.0, **ADVANCED,
                               tooltip="As on Attention Guidance Losses: attention x this before the softmax over "
                                       "tokens. A&E: 100."),
                io.Float.Input("smoothing_sigma", default=0.5, min=0.05, max=5.0, step=0.05, **ADVANCED,
                               tooltip="As on Attention Guidance Losses: sigma of the 3x3 Gaussian smoothing. "
                                       "A&E: 0.5."),
                io.Boolean.Input("exclude_padding", default=False, **ADVANCED,
                                 tooltip="As on Attention Guidance Losses: softmax over the prompt's words only "
                                         "(the authors' SD2 variant)."),
            ],
            outputs=[io.String.Output(display_name="METRICS",
                                      tooltip="JSON: a list with one object per image (subjects, steps, peak, "
                                              "min_peak and overlap per step, retention).")],
        )

    @classmethod
    def execute(cls, attention, retention_from, softmax_temperature=100.0, smoothing_sigma=0.5,
                exclude_padding=False) -> io.NodeOutput:
        metrics = attention_metrics(attention, retention_from, softmax_temperature, smoothing_sigma, exclude_padding)
        summary = [f"image {i}: min peak {m['min_peak'][-1]:.4g}"
                   + ("" if m["overlap"][-1] is None else f", overlap {m['overlap'][-1]:.4g}")
                   + f", retention {m['retention']:.4g} (steps {m['retention_steps'][0]}..{m['retention_steps'][1]})"
                   for i, m in enumerate(metrics)]
        return io.NodeOutput(json.dumps(metrics), ui={"attention_metrics": metrics, "text": summary})


NODES = [AttentionMetrics]
