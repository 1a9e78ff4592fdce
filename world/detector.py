"""Reads the (colour, shape) objects back from a picture of the world: no learned part.

1. The picture is averaged down to the world's latent grid (a 256 px VAE decode gives 8 x 8 blocks).
2. The background is found first: its colour is the median of the border pixels, so a background that
   drifted (towards red, say) is still the background, and it is the anchor of step 3.
3. Each pixel is explained as a mix of the background and one palette colour (alpha * colour + (1 - alpha)
   * background, the way an anti-aliased edge is): it belongs to the colour whose mix fits it best, if the
   mix holds at least half of that colour (alpha >= ALPHA) and fits within MAX_RESIDUAL; else to the
   background.
4. The 4-connected components of each colour that are at least MIN_AREA latent pixels large are the
   objects; the largest component touching the border is dropped as well when it covers more than
   BACKGROUND_SHARE of the picture (a background that drifted into a palette colour).
5. A component's shape comes from the moments of its colour's alpha over it (the component grown by one
   pixel, so that anti-aliased edges count with their share): a triangle (apex up) is skewed along y
   (|skewness| about 0.57; circle and square 0); a square's x and y are independent, a circle's are not:
   E[x^2 y^2] / (E[x^2] E[y^2]) is 1 for a square, 2/3 for a circle.

Apart from the objects, `off_palette_pixels` counts the pixels that no mix of the background and one palette
colour comes near (farther than OFF_PALETTE): specks of colours no object of the world has (magenta, cyan,
noise), which a picture broken by too strong a guidance step holds and a drawn scene does not. The detector
reads those pixels as background, so the objects it finds do not say whether the picture is clean.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .scenes import COLOURS, GRID

ALPHA = 0.5
MAX_RESIDUAL = 0.25
MIN_AREA = 12            # latent pixels; the smallest drawn object (a triangle of half-size 4) covers about 32
BACKGROUND_SHARE = 0.4
OFF_PALETTE = 0.5        # twice MAX_RESIDUAL; 90% (UNet) and 98% (DiT) of the world models' plain pictures stay within
TRIANGLE_SKEW = 0.3      # |skewness along y| above this: triangle
SQUARE_RATIO = 0.83      # E[x^2 y^2] / (E[x^2] E[y^2]) above this: square, else circle

_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[name] for name in _NAMES], np.float32)


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    area: int                         # latent pixels
    box: tuple[int, int, int, int]    # top, left, height, width in latent pixels

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape


def to_grid(image: np.ndarray, grid: int = GRID) -> np.ndarray:
    """[H, W, 3] -> [grid, grid, 3] by block means (H and W multiples of grid)."""
    image = np.asarray(image, np.float32)
    height, width = image.shape[:2]
    if height == grid and width == grid:
        return image
    if height % grid or width % grid:
        raise ValueError(f"picture {width}x{height} is not a multiple of the {grid}x{grid} grid")
    return image.reshape(grid, height // grid, grid, width // grid, 3).mean(axis=(1, 3))


def palette_mixes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[g, g, 3] -> each pixel's best mix of the background and each palette colour (step 3): its alpha [g, g, C]
    in 0..1 and the distance of the pixel from that mix [g, g, C]. The background is the border's median (step
    2)."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    background = np.median(border, axis=0)
    direction = _PALETTE - background                                   # [C, 3]
    offset = image[..., None, :] - background                           # [g, g, 1, 3]
    alpha = np.clip((offset * direction).sum(-1) / (direction * direction).sum(-1).clip(1e-6), 0, 1)  # [g, g, C]
    return alpha, np.linalg.norm(offset - alpha[..., None] * direction, axis=-1)


def colour_labels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[g, g, 3] -> labels [g, g] int (palette index + 1 for object pixels, 0 for the background) and each
    palette colour's alpha [g, g, C] (steps 2-3)."""
    alpha, residual = palette_mixes(image)
    score = np.where(alpha >= ALPHA, residual, np.inf)
    best = score.argmin(axis=-1)
    ok = np.take_along_axis(score, best[..., None], -1)[..., 0] <= MAX_RESIDUAL
    return np.where(ok, best + 1, 0), alpha


def off_palette_pixels(image: np.ndarray) -> int:
    """How many latent pixels of one picture ([H, W, 3], as detect() takes it) lie farther than OFF_PALETTE from
    every mix of the background and one palette colour."""
    _, residual = palette_mixes(to_grid(image))
    return int((residual.min(axis=-1) > OFF_PALETTE).sum())


def classify_shape(weights: np.ndarray) -> str:
    """Shape of one object from its alpha weights [h, w] (step 5)."""
    total = weights.sum()
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    y = ys - (weights * ys).sum() / total
    x = xs - (weights * xs).sum() / total
    var_y, var_x = (weights * y * y).sum() / total, (weights * x * x).sum() / total
    skew = (weights * y ** 3).sum() / total / max(var_y, 1e-9) ** 1.5
    if abs(skew) > TRIANGLE_SKEW:
        return "triangle"
    ratio = (weights * x * x * y * y).sum() / total / max(var_x * var_y, 1e-9)
    return "square" if ratio > SQUARE_RATIO else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """The objects of one picture ([H, W, 3] RGB in 0..1, H and W multiples of GRID), largest first."""
    grid = to_grid(image)
    labels, alpha = colour_labels(grid)
    found = []
    for index, name in enumerate(_NAMES):
        components, count = ndimage.label(labels == index + 1)
        if not count:
            continue
        areas = ndimage.sum_labels(np.ones_like(components), components, index=np.arange(1, count + 1))
        for number, box in enumerate(ndimage.find_objects(components)):
            area = int(areas[number])
            if area < MIN_AREA:
                continue
            top, bottom, left, right = box[0].start, box[0].stop, box[1].start, box[1].stop
            touches = top == 0 or left == 0 or bottom == grid.shape[0] or right == grid.shape[1]
            if touches and area > BACKGROUND_SHARE * labels.size:
                continue
            grown = (slice(max(top - 1, 0), bottom + 1), slice(max(left - 1, 0), right + 1))
            region = ndimage.binary_dilation(components[grown] == number + 1)
            shape = classify_shape(alpha[grown][..., index] * region)
            found.append(Detection(name, shape, area, (top, left, bottom - top, right - left)))
    return sorted(found, key=lambda d: -d.area)


def detect_batch(images: np.ndarray) -> list[list[Detection]]:
    """detect() for each picture of [N, H, W, 3]."""
    return [detect(image) for image in images]
