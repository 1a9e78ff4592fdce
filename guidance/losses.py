"""Attention losses, one pure function each, named as in the papers.

Every loss takes the subjects' processed maps A: [B, S, H, W] (fp32; B images, S subjects) and
returns a per-image loss [B]. The guidance minimises the weighted sum of the selected losses.
Adding a loss is adding a function and one `LOSSES` entry; the sampler needs no change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- map processing (Attend-and-Excite)

def reference_gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The 2-D smoothing kernel of the Attend-and-Excite reference code, reproduced exactly.

    Quirk: the reference writes exp(-((x - mean) / (2 * sigma)) ** 2), not exp(-(x - mean)**2 / (2 sigma**2)),
    so its effective standard deviation is sigma * sqrt(2) (0.707 for the default 0.5). The
    normalisation constant cancels in the final division by the sum.
    """
    coords = torch.arange(kernel_size, dtype=torch.float32)
    mean = (kernel_size - 1) / 2
    one_d = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((coords - mean) / (2 * sigma)) ** 2))
    kernel = one_d[:, None] * one_d[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian smoothing with reflect padding, as the reference: [..., H, W] -> [..., H, W]."""
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    pad = kernel_size // 2
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    kernel = reference_gaussian_kernel(kernel_size, sigma).to(flat)[None, None]
    return F.conv2d(flat, kernel).reshape(shape)


def text_attention(aggregated: torch.Tensor, chunk_start: int, end_position: int, chunk_length: int,
                   temperature: float = 100.0, exclude_padding: bool = False) -> torch.Tensor:
    """Attend-and-Excite's re-weighting of one chunk: drop the start token, scale, softmax over tokens.

    aggregated: [B, N, T]. Keeps positions 1..chunk_length-2 of the chunk (the reference's
    `[:, :, 1:-1]`: end token and padding included), or 1..end_position-1 with `exclude_padding`
    (the authors' SD2 variant, for SD2's '!' padding). Returns [B, N, chunk_length] with the dropped
    positions set to 0, so that subject positions index it directly.
    """
    stop = end_position if exclude_padding else chunk_length - 1
    kept = aggregated[:, :, chunk_start + 1:chunk_start + stop].float() * temperature
    probs = kept.softmax(dim=-1)
    out = probs.new_zeros(*probs.shape[:2], chunk_length)
    out[:, :, 1:stop] = probs
    return out


def subject_attention_maps(aggregated: torch.Tensor, subjects, resolution: tuple[int, int],
                           temperature: float = 100.0, exclude_padding: bool = False) -> torch.Tensor:
    """[B, N, T] -> [B, S, H, W]: each subject's re-weighted map (mean over its word pieces), unsmoothed."""
    batch = aggregated.shape[0]
    per_chunk = {}
    maps = []
    for subject in subjects.subjects:
        if subject.chunk not in per_chunk:
            per_chunk[subject.chunk] = text_attention(
                aggregated, subject.chunk * subjects.chunk_length, subjects.end_positions[subject.chunk],
                subjects.chunk_length, temperature, exclude_padding)
        in_chunk = list(subject.positions_in_chunk(subjects.chunk_length))
        maps.append(per_chunk[subject.chunk][:, :, in_chunk].mean(dim=-1))
    return torch.stack(maps, dim=1).reshape(batch, len(maps), *resolution)


def max_attention_per_subject(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """[B, S, H, W] -> [B, S]: the peak of each smoothed subject map."""
    return smooth(maps, kernel_size, sigma).flatten(2).max(dim=-1).values


# ---------------------------------------------------------------- losses

def attend_and_excite_loss(maps: torch.Tensor, smoothing_sigma: float = 0.5, **_) -> torch.Tensor:
    """Attend-and-Excite (Chefer et al. 2023, Eq. 1): L = max_s (1 - max_ij G * A_s), floored at 0.

    The most neglected subject decides the loss; minimising it raises that subject's peak attention.
    """
    peaks = max_attention_per_subject(maps, sigma=smoothing_sigma)
    return (1.0 - peaks).clamp(min=0.0).max(dim=1).values


def _soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_ij min(a, b) / sum_ij (a + b) over the last two dims."""
    return torch.minimum(a, b).flatten(-2).sum(-1) / (a + b).flatten(-2).sum(-1).clamp(min=1e-12)


def segregation_loss(maps: torch.Tensor, smoothing_sigma: float = 0.5, **_) -> torch.Tensor:
    """A-STAR segregation (Agarwal et al. 2023): L_seg = sum_{m<n} sum_ij min(A_m, A_n) / sum_ij (A_m + A_n).

    A are the smoothed subject maps. Zero when no two subjects share a pixel; 0.5 per pair when
    they coincide. Undefined for fewer than two subjects (the sampler skips it then).
    """
    smoothed = smooth(maps, sigma=smoothing_sigma)
    count = smoothed.shape[1]
    total = smoothed.new_zeros(smoothed.shape[0])
    for m in range(count):
        for n in range(m + 1, count):
            total = total + _soft_iou(smoothed[:, m], smoothed[:, n])
    return total


def retention_mask(maps: torch.Tensor, threshold: float = 0.5, smoothing_sigma: float = 0.5) -> torch.Tensor:
    """B_m: the binary high-attention region of each subject, {A_m >= threshold * max A_m}. [B,S,H,W]."""
    smoothed = smooth(maps, sigma=smoothing_sigma).detach()
    peak = smoothed.flatten(2).max(dim=-1).values[..., None, None]
    return (smoothed >= threshold * peak).to(maps.dtype)


def retention_loss(maps: torch.Tensor, previous_masks: torch.Tensor | None = None, smoothing_sigma: float = 0.5,
                   **_) -> torch.Tensor:
    """A-STAR retention: L_ret = sum_m [1 - sum_ij min(A_m(t), B_m(t+1)) / sum_ij (A_m(t) + B_m(t+1))].

    B_m(t+1) is subject m's binary mask from the previous (noisier) step (`retention_mask`). Zero
    loss is not reachable (the ratio is at most 1/2); lower means the map stays inside its region.
    Without a previous mask (the first guided step) the loss is 0.
    """
    if previous_masks is None:
        return maps.new_zeros(maps.shape[0])
    smoothed = smooth(maps, sigma=smoothing_sigma)
    return (1.0 - _soft_iou(smoothed, previous_masks)).sum(dim=1)


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation over the last two dims: sum |dA/di| + |dA/dj|."""
    return ((maps[..., 1:, :] - maps[..., :-1, :]).abs().flatten(-2).sum(-1)
            + (maps[..., :, 1:] - maps[..., :, :-1]).abs().flatten(-2).sum(-1))


def attendance_loss(maps: torch.Tensor, smoothing_sigma: float = 0.5, **_) -> torch.Tensor:
    """Divide & Bind attendance (Li et al. 2023): L_attend = -min_s TV(G * A_s).

    Total variation is high where a subject's map has strong, structured activations; maximising the
    weakest subject's TV makes every subject attended somewhere.
    """
    return -total_variation(smooth(maps, sigma=smoothing_sigma)).min(dim=1).values


@dataclass(frozen=True)
class LossSpec:
    function: Callable[..., torch.Tensor]
    min_subjects: int = 1
    needs_previous_masks: bool = False
    description: str = ""


LOSSES: dict[str, LossSpec] = {
    "attend_and_excite": LossSpec(attend_and_excite_loss, description="raise the weakest subject's peak attention"),
    "segregation": LossSpec(segregation_loss, min_subjects=2, description="keep subjects off each other's pixels"),
    "retention": LossSpec(retention_loss, needs_previous_masks=True, description="keep each subject in its region"),
    "attendance": LossSpec(attendance_loss, description="Divide & Bind: maximise the weakest subject's total variation"),
}


def combined_loss(maps: torch.Tensor, weights: dict[str, float], previous_masks: torch.Tensor | None = None,
                  smoothing_sigma: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the selected losses: ([B] total, {name: [B] term}). Zero weights are skipped."""
    terms = {}
    total = maps.new_zeros(maps.shape[0])
    for name, weight in weights.items():
        spec = LOSSES[name]
        if weight == 0 or maps.shape[1] < spec.min_subjects:
            continue
        term = spec.function(maps, previous_masks=previous_masks, smoothing_sigma=smoothing_sigma)
        terms[name] = term
        total = total + weight * term
    return total, terms
