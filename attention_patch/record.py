"""The ATTENTION value: what a guided or capture-only run recorded, per step and per subject."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..subjects import Subjects


@dataclass
class StepLoss:
    """Losses of one sampling step (one value per image of the batch)."""
    step: int
    sigma: float
    terms: dict[str, list[float]]        # loss name -> per image, before the update
    total: list[float]                   # weighted sum, before the update
    refinement: list[list[float]] = field(default_factory=list)  # total per refinement iteration


@dataclass
class AttentionRecord:
    """Aggregated cross-attention of the positive prompt, one entry per recorded step.

    maps[step] is [batch, H*W, tokens] (fp32, CPU): softmax probabilities averaged uniformly over
    every head of every captured layer; each pixel sums to 1 over the tokens.
    """
    subjects: Subjects
    resolution: tuple[int, int]
    steps: list[int] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    losses: list[StepLoss] = field(default_factory=list)
    total_steps: int = 0

    def add_maps(self, step: int, sigma: float, maps: torch.Tensor) -> None:
        self.steps.append(step)
        self.sigmas.append(sigma)
        self.maps.append(maps.detach().float().cpu())

    def subject_maps(self, index: int) -> torch.Tensor:
        """Raw maps of each subject at recorded entry `index`: [batch, subjects, H, W] (mean over its tokens)."""
        return raw_subject_maps(self.maps[index], self.subjects, self.resolution)

    @property
    def loss_names(self) -> list[str]:
        names: list[str] = []
        for entry in self.losses:
            names.extend(n for n in entry.terms if n not in names)
        return names


def raw_subject_maps(aggregated: torch.Tensor, subjects: Subjects, resolution: tuple[int, int]) -> torch.Tensor:
    """[B, H*W, T] -> [B, S, H, W]: each subject's raw probability map, mean over its token positions."""
    batch = aggregated.shape[0]
    maps = [aggregated[:, :, list(s.token_positions)].mean(dim=-1) for s in subjects.subjects]
    return torch.stack(maps, dim=1).reshape(batch, len(maps), *resolution)
