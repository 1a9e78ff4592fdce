"""The ATTENTION value: what a guided or capture-only run recorded, per step and per subject."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..text.subjects import Subjects

Area = tuple[float, float, float, float]  # (top, left, height, width), fractions of the full image


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
    """Aggregated cross-attention of the subjects' prompt, one entry per recorded step.

    maps[i] is entry i as captured, [batch, h*w, tokens] (fp32, CPU): softmax probabilities averaged
    uniformly over every head of every captured layer, over the tokens of the subjects' own text (the
    subjects' positions index it). Each pixel sums to 1 over the tokens, except when that text was
    concatenated with another (ConditioningConcat): the softmax then ran over both texts and the record
    keeps the subjects' share.
    resolutions[i] is its (h, w) and areas[i] the rectangle of the image it covers (None: all of it).

    `resolution` is the run's nominal grid: the size the maps have without patches that resize the
    latent inside the model (Kohya Deep Shrink). Consumers read entries through grid_maps(i), which
    puts every entry on that grid; maps[i] itself is on it only when resolutions[i] == resolution and
    areas[i] is None (the usual case, where grid_maps(i) is maps[i]).
    """
    subjects: Subjects
    resolution: tuple[int, int]
    steps: list[int] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    losses: list[StepLoss] = field(default_factory=list)
    total_steps: int = 0
    resolutions: list[tuple[int, int]] = field(default_factory=list)
    areas: list[Area | None] = field(default_factory=list)
    initno: dict | None = None  # InitNO's stage, when it ran: succeeded, final scores, history per pass

    def add_maps(self, step: int, sigma: float, maps: torch.Tensor, resolution: tuple[int, int] | None = None,
                 area: Area | None = None) -> None:
        """Record one step's maps.

        Args:
            maps: [batch, h*w, tokens], on the grid `resolution` = (h, w) (default: the nominal one).
            area: (top, left, height, width) in 0..1, the part of the image the maps cover (the area of
                ConditioningSetArea); None for the whole image.
        """
        resolution = tuple(int(n) for n in (resolution or self.resolution))
        if maps.ndim != 3 or maps.shape[1] != resolution[0] * resolution[1]:
            raise ValueError(f"attention maps of shape {tuple(maps.shape)} do not hold {resolution[0]}x"
                             f"{resolution[1]} pixels: expected [batch, {resolution[0] * resolution[1]}, tokens]")
        area = _check_area(area)
        self.steps.append(step)
        self.sigmas.append(sigma)
        self.maps.append(maps.detach().float().cpu())
        self.resolutions.append(resolution)
        self.areas.append(area)

    def entry_resolution(self, index: int) -> tuple[int, int]:
        """(h, w) of maps[index] as captured."""
        return self._per_entry(self.resolutions, index, tuple(self.resolution))

    def entry_area(self, index: int) -> Area | None:
        """The rectangle maps[index] covers, (top, left, height, width) in 0..1; None = the whole image."""
        return self._per_entry(self.areas, index, None)

    def grid_box(self, index: int) -> tuple[int, int, int, int]:
        """Entry `index`'s rectangle on the nominal grid in pixels: (top, left, height, width)."""
        return area_box(self.entry_area(index), self.resolution)

    def grid_maps(self, index: int) -> torch.Tensor:
        """Entry `index` on the nominal grid, [batch, H*W, tokens] with (H, W) = resolution.

        An entry of another size is resized bilinearly (align_corners=False, no antialiasing), token by
        token: each grid pixel is a convex combination of captured pixels, so it still sums to 1 over the
        tokens. An area entry is resized to its rectangle's size on the grid (edges rounded to the
        nearest pixel) and placed there; grid pixels outside the rectangle are all 0 (no attention).
        """
        maps = self.maps[index]
        area = self.entry_area(index)
        if self.entry_resolution(index) == tuple(self.resolution) and area is None:
            return maps
        return place_on_grid(maps, self.entry_resolution(index), area, self.resolution)

    def grid_coverage(self, index: int) -> torch.Tensor:
        """[H, W] float: 1 where entry `index` has maps on the nominal grid, 0 outside its area."""
        coverage = torch.zeros(self.resolution)
        top, left, height, width = self.grid_box(index)
        coverage[top:top + height, left:left + width] = 1.0
        return coverage

    @property
    def has_areas(self) -> bool:
        return any(area is not None for area in self.areas)

    def subject_maps(self, index: int) -> torch.Tensor:
        """Raw maps of each subject at recorded entry `index` on the nominal grid: [batch, subjects, H, W]
        (mean over its tokens)."""
        return raw_subject_maps(self.grid_maps(index), self.subjects, self.resolution)

    @property
    def loss_names(self) -> list[str]:
        names: list[str] = []
        for entry in self.losses:
            names.extend(n for n in entry.terms if n not in names)
        return names

    def _per_entry(self, values: list, index: int, default):
        # records whose maps were appended without add_maps (older code) hold nominal, whole-image entries
        index = range(len(self.maps))[index]
        return values[index] if index < len(values) else default


def _check_area(area) -> Area | None:
    if area is None:
        return None
    values = tuple(float(v) for v in area)
    if len(values) != 4:
        raise ValueError(f"area must be (top, left, height, width), got {area!r}")
    top, left, height, width = values
    eps = 1e-6
    if not (all(math.isfinite(v) and -eps <= v <= 1 + eps for v in values) and height > 0 and width > 0
            and top + height <= 1 + eps and left + width <= 1 + eps):
        raise ValueError(f"area (top, left, height, width) = {values} must lie inside the image: fractions in "
                         "0..1, height and width above 0, top + height and left + width at most 1")
    return values


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def area_box(area: Area | None, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in 0..1 -> the rectangle on an H x W grid in whole pixels, edges rounded
    to the nearest pixel (half up), at least one pixel each way. None -> the whole grid."""
    rows, cols = grid
    if area is None:
        return 0, 0, rows, cols
    top, left, height, width = area

    def edges(start: float, size: float, count: int) -> tuple[int, int]:
        first = min(max(_round(start * count), 0), count - 1)
        last = min(max(_round((start + size) * count), first + 1), count)
        return first, last - first

    top_px, height_px = edges(top, height, rows)
    left_px, width_px = edges(left, width, cols)
    return top_px, left_px, height_px, width_px


def resize_maps(maps: torch.Tensor, resolution: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, T] on `resolution` (h, w) -> [B, H*W, T] on `size` (H, W), bilinear per token
    (align_corners=False, no antialiasing)."""
    batch, _, tokens = maps.shape
    if tuple(resolution) == tuple(size):
        return maps
    grid = maps.reshape(batch, *resolution, tokens).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(batch, size[0] * size[1], tokens)


def place_on_grid(maps: torch.Tensor, resolution: tuple[int, int], area: Area | None,
                  grid: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, T] covering `area` at `resolution` -> [B, H*W, T] on `grid`: resized into the area's
    rectangle (see area_box), zeros outside it."""
    top, left, height, width = area_box(area, grid)
    inside = resize_maps(maps, resolution, (height, width))
    if (height, width) == tuple(grid):
        return inside
    batch, _, tokens = maps.shape
    out = maps.new_zeros(batch, grid[0], grid[1], tokens)
    out[:, top:top + height, left:left + width] = inside.reshape(batch, height, width, tokens)
    return out.reshape(batch, grid[0] * grid[1], tokens)


def raw_subject_maps(aggregated: torch.Tensor, subjects: Subjects, resolution: tuple[int, int]) -> torch.Tensor:
    """[B, H*W, T] -> [B, S, H, W]: each subject's raw probability map, mean over its token positions."""
    batch = aggregated.shape[0]
    maps = [aggregated[:, :, list(s.token_positions)].mean(dim=-1) for s in subjects.subjects]
    return torch.stack(maps, dim=1).reshape(batch, len(maps), *resolution)
