"""Pictures of attention: heat maps, step timelines, subject overlap, attribute binding and loss plots.

Pure numpy / PIL / torch, no ComfyUI: every function takes plain arrays and returns float32 RGB
images [H, W, 3] in 0..1 (ComfyUI's IMAGE layout without the batch axis).

Display conventions (what the Attention Map Visualiser documents):
- every map is normalised to its own min..max after upsampling, so its weakest pixel is the cold end
  of the colormap and its strongest the hot end; the raw peak value is printed in the caption (the
  binding view's disagreement panel is the exception: it is drawn on a fixed 0..1 scale, so that
  agreement stays cold);
- maps are upsampled bilinearly (align_corners=False) to the picture's size;
- with a picture, the coloured map is blended over it: out = (1 - opacity) * picture + opacity * map;
- a map may cover only part of the picture (a `coverage` mask, e.g. the rectangle of an area prompt):
  it is normalised over the covered pixels only, and outside them the picture shows unchanged (grey
  UNCOVERED without a picture).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# ---------------------------------------------------------------- colormaps

# 33 evenly spaced entries of matplotlib's 256-entry tables (viridis, inferno, magma, plasma: CC0, by
# Stefan van der Walt and Nathaniel Smith; turbo: Apache-2.0, Google LLC), as 8-bit RGB. Linear
# interpolation between them stays within 3/255 of the full tables.
_LISTED = {
    "viridis": "440154 470d60 48186a 482374 472d7b 453781 424086 3e4989 3b528b 375b8d 33638d 2f6b8e 2c728e "
               "297a8e 26828e 23898e 21918c 1f978b 1f9f88 21a685 27ad81 31b57b 3dbc74 4cc26c 5cc863 6ece58 "
               "81d34d 95d840 aadc32 c0df25 d5e21a eae51a fde725",
    "inferno": "000004 040312 0b0724 150b37 210c4a 2f0a5b 3d0965 4a0c6b 57106e 64156e 71196e 7d1e6d 8a226a "
               "972766 a32c61 b0315b bc3754 c63d4d d04545 da4e3c e35933 eb6429 f1711f f67e14 f98c0a fb9b06 "
               "fcaa0f fbba1f f9c932 f5d949 f2e865 f3f586 fcffa4",
    "magma": "000004 030312 0a0822 130d34 1d1147 29115a 36106b 440f76 51127c 5d177f 6a1c81 762181 832681 "
             "902a81 9c2e7f aa337d b73779 c23b75 cf4070 db476a e55064 ee5b5e f4695c f9785d fb8761 fd9668 "
             "fea571 feb47b fec287 fed194 fde0a1 fceeb0 fcfdbf",
    "plasma": "0d0887 220690 310597 3f049c 4c02a1 5901a5 6600a7 7201a8 7e03a8 8a09a5 9511a1 a01a9c aa2395 "
              "b32c8e bc3587 c43e7f cc4778 d24f71 d9586a df6263 e56b5d eb7556 f07f4f f48948 f89441 fb9f3a "
              "fdab33 feb72d fdc328 fcd025 f9dd25 f5eb27 f0f921",
    "turbo": "30123b 392a73 4040a2 4456c7 466be3 4680f6 4294ff 37a8fa 28bceb 1ccdd8 18ddc2 1fe9af 32f298 "
             "4ef97d 6dfe62 8bff4b a4fc3c b7f735 cbed34 dde037 ecd13a f7c13a fdae35 fe992c fb8122 f56918 "
             "ec530f e14109 d23105 c12302 ac1701 950d01 7a0403",
}
# matplotlib's piecewise-linear definition of jet: per channel, (position, value) breakpoints.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_LUT_SIZE = 256
UNCOVERED = 0.35  # the grey drawn outside a map's coverage when there is no picture


def _lut_from_hex(entries: str) -> np.ndarray:
    points = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in entries.split()], np.float64) / 255.0
    at = np.linspace(0.0, 1.0, len(points))
    t = np.linspace(0.0, 1.0, _LUT_SIZE)
    return np.stack([np.interp(t, at, points[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def _lut_from_segments(segments: dict) -> np.ndarray:
    t = np.linspace(0.0, 1.0, _LUT_SIZE)
    channels = [np.interp(t, [p for p, _ in segments[c]], [v for _, v in segments[c]])
                for c in ("red", "green", "blue")]
    return np.stack(channels, axis=-1).astype(np.float32)


COLORMAPS: dict[str, np.ndarray] = {
    "turbo": _lut_from_hex(_LISTED["turbo"]),
    "jet": _lut_from_segments(_JET),
    "inferno": _lut_from_hex(_LISTED["inferno"]),
    "viridis": _lut_from_hex(_LISTED["viridis"]),
    "magma": _lut_from_hex(_LISTED["magma"]),
    "plasma": _lut_from_hex(_LISTED["plasma"]),
    "gray": np.repeat(np.linspace(0.0, 1.0, _LUT_SIZE, dtype=np.float32)[:, None], 3, axis=1),
}

# Overlap mode: one colour per subject, mixed additively (red + green = yellow where both attend).
SUBJECT_COLOURS = np.array([
    (1.00, 0.10, 0.10), (0.10, 1.00, 0.10), (0.20, 0.40, 1.00), (1.00, 0.85, 0.00), (1.00, 0.20, 1.00),
    (0.00, 0.90, 0.90), (1.00, 0.55, 0.00), (0.70, 0.50, 1.00),
], np.float32)

# Loss plot: total in black, terms in matplotlib's tab10 colours.
_TERM_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_REFINEMENT_COLOUR = (190, 0, 190)


def colormap_names() -> list[str]:
    return list(COLORMAPS)


def apply_colormap(values: np.ndarray, name: str) -> np.ndarray:
    """values in 0..1 (any shape) -> RGB float32 [..., 3]; 0 is the cold end, 1 the hot end."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; valid: {', '.join(COLORMAPS)}")
    lut = COLORMAPS[name]
    index = np.clip(np.asarray(values, np.float32) * (_LUT_SIZE - 1), 0, _LUT_SIZE - 1)
    low = np.floor(index).astype(np.int64)
    high = np.minimum(low + 1, _LUT_SIZE - 1)
    frac = (index - low)[..., None]
    return (lut[low] * (1.0 - frac) + lut[high] * frac).astype(np.float32)


# ---------------------------------------------------------------- maps

def normalise(maps: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Each [.., H, W] map to its own min..max (a constant map becomes all 0); with a boolean `mask`
    (broadcast to the maps), the min..max of the pixels it covers (pixels outside may leave 0..1)."""
    maps = np.asarray(maps, np.float32)
    if mask is None:
        low = maps.min(axis=(-2, -1), keepdims=True)
        high = maps.max(axis=(-2, -1), keepdims=True)
    else:
        mask = np.broadcast_to(mask, maps.shape)
        low = np.where(mask, maps, np.inf).min(axis=(-2, -1), keepdims=True)
        high = np.where(mask, maps, -np.inf).max(axis=(-2, -1), keepdims=True)
        empty = ~mask.any(axis=(-2, -1), keepdims=True)
        low, high = np.where(empty, 0.0, low), np.where(empty, 0.0, high)
    span = high - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def upsample(maps, size: tuple[int, int]) -> np.ndarray:
    """[N, h, w] maps -> [N, H, W] float32, bilinear (align_corners=False, no antialias needed: h <= H)."""
    tensor = torch.as_tensor(np.asarray(maps, np.float32) if not isinstance(maps, torch.Tensor) else maps)
    tensor = tensor.detach().float().cpu()[:, None]
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(tensor, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return tensor[:, 0].numpy()


def coverage_mask(coverage, size: tuple[int, int]) -> np.ndarray | None:
    """[.., h, w] coverage (1 = covered) -> boolean [.., H, W] (nearest pixel, so the edges stay sharp);
    None stays None."""
    if coverage is None:
        return None
    tensor = torch.as_tensor(np.asarray(coverage, np.float32) if not isinstance(coverage, torch.Tensor) else coverage)
    tensor = tensor.detach().float().cpu()
    lead = tensor.shape[:-2]
    tensor = tensor.reshape(-1, 1, *tensor.shape[-2:])
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(tensor, size=tuple(int(s) for s in size), mode="nearest-exact")
    return (tensor.reshape(*lead, *size) > 0.5).numpy()


def display_size(resolution: tuple[int, int], long_side: int = 512) -> tuple[int, int]:
    """(H, W) with the map's aspect ratio and `long_side` pixels on its longer side."""
    h, w = resolution
    scale = long_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def blend(colour: np.ndarray, picture: np.ndarray | None, opacity: float, mask: np.ndarray | None = None) -> np.ndarray:
    """(1 - opacity) * picture + opacity * colour; without a picture the colour alone. With a boolean
    [H, W] `mask`, only where it is set: elsewhere the picture (UNCOVERED grey without one)."""
    if picture is None:
        mixed = colour.astype(np.float32)
    else:
        mixed = ((1.0 - opacity) * picture + opacity * colour).astype(np.float32)
    if mask is None:
        return mixed
    outside = picture if picture is not None else np.full_like(mixed, UNCOVERED)
    return np.where(mask[..., None], mixed, outside).astype(np.float32)


def fit_picture(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 float picture resized (bilinear, antialiased) to size (H, W)."""
    picture = np.asarray(picture, np.float32)[..., :3]
    if picture.shape[:2] == tuple(size):
        return picture
    tensor = torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1)[None]
    tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    return tensor[0].permute(1, 2, 0).clamp(0, 1).numpy()


# ---------------------------------------------------------------- text

@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at `size` px (the scalable one where FreeType exists, else the bitmap one)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def text_size(text: str, face) -> tuple[int, int]:
    left, top, right, bottom = face.getbbox(text)
    return right - left, bottom - top


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


def label_size(height: int, width: int) -> int:
    """Caption font size for a picture: 1/16 of its shorter side, 16..40 px (readable in the node preview)."""
    return int(min(40, max(16, round(min(height, width) / 16))))


def _detail_size(size: int) -> int:
    return max(12, round(size * 0.68))


def draw_caption(canvas: Image.Image, title: str, detail: str = "", colormap: str | None = None,
                 size: int | None = None, bar_labels: tuple[str, str] = ("min", "max")) -> None:
    """A dark translucent box at the top-left with a title, a smaller detail line and, given a
    colormap, its colour bar (left = the map's minimum, right = its maximum; `bar_labels` name the ends)."""
    size = size or label_size(canvas.height, canvas.width)
    big, small = font(size), font(_detail_size(size))
    pad = max(3, size // 4)
    title_w, title_h = text_size(title, big)
    detail_w, detail_h = text_size(detail, small) if detail else (0, 0)
    low_text, high_text = bar_labels
    bar_w = max(title_w, detail_w, size * 4, text_size(f"{low_text}  {high_text}", small)[0])
    bar_h = max(4, size // 3) if colormap else 0
    box_w = bar_w + 2 * pad
    box_h = (pad + size + (pad // 2 + _detail_size(size) if detail else 0)
             + (pad + bar_h + _detail_size(size) if colormap else 0) + pad)
    box_w = min(box_w, canvas.width)
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rounded_rectangle((0, 0, box_w, box_h), radius=pad, fill=(0, 0, 0, 170))
    y = pad
    draw.text((pad, y), title, font=big, fill=(255, 255, 255, 255))
    y += size
    if detail:
        y += pad // 2
        draw.text((pad, y), detail, font=small, fill=(220, 220, 220, 255))
        y += _detail_size(size)
    if colormap:
        y += pad
        bar = apply_colormap(np.linspace(0, 1, bar_w)[None].repeat(bar_h, 0), colormap)
        overlay.paste(Image.fromarray((bar * 255).astype(np.uint8), "RGB").convert("RGBA"), (pad, y))
        y += bar_h
        draw.text((pad, y), low_text, font=small, fill=(220, 220, 220, 255))
        draw.text((pad + bar_w - text_size(high_text, small)[0], y), high_text, font=small, fill=(220, 220, 220, 255))
    base = canvas.convert("RGBA")
    base.alpha_composite(overlay)
    canvas.paste(base.convert("RGB"))


# ---------------------------------------------------------------- heat maps (modes "step" and "average")

def render_heatmaps(maps, labels: list[str], colormap: str, picture: np.ndarray | None = None,
                    opacity: float = 0.6, details: list[str] | None = None, long_side: int = 512,
                    coverage=None) -> np.ndarray:
    """One labelled heat map per subject.

    maps: [S, h, w] raw attention; picture: [H, W, 3] 0..1 to draw over (its size is the output size)
    or None (then `long_side` px with the maps' aspect ratio); coverage: [h, w], 1 where the maps
    hold attention, or None for everywhere. Returns [S, H, W, 3] float32.
    """
    maps = np.asarray(maps.detach().cpu().float() if isinstance(maps, torch.Tensor) else maps, np.float32)
    size = picture.shape[:2] if picture is not None else display_size(maps.shape[-2:], long_side)
    mask = coverage_mask(coverage, size)
    heat = apply_colormap(normalise(upsample(maps, size), mask), colormap)
    out = []
    for index, label in enumerate(labels):
        canvas = _to_pil(blend(heat[index], picture, opacity, mask))
        draw_caption(canvas, label, details[index] if details else "", colormap)
        out.append(_from_pil(canvas))
    return np.stack(out)


# ---------------------------------------------------------------- timeline

TIMELINE_COLUMNS = 25  # steps per band; longer runs wrap into several bands, one under the other


def _tile_side(columns: int) -> int:
    return int(min(128, max(48, 2400 // max(columns, 1))))


def render_timeline(maps, labels: list[str], steps: list[int], colormap: str, picture: np.ndarray | None = None,
                    opacity: float = 0.6, title: str = "", coverage=None) -> np.ndarray:
    """A grid: one row per subject, one column per recorded step, each tile normalised to its own min..max.

    More than TIMELINE_COLUMNS steps wrap into bands of equal length, each with its own step header
    and subject rows. maps: [T, S, h, w]; steps: the T sampling step numbers; coverage: [T, h, w]
    (1 where step t's maps hold attention) or None. Returns [H, W, 3].
    """
    maps = np.asarray(maps.detach().cpu().float() if isinstance(maps, torch.Tensor) else maps, np.float32)
    count, subjects = maps.shape[:2]
    bands = math.ceil(count / TIMELINE_COLUMNS)
    per_band = math.ceil(count / bands)
    tile_h, tile_w = display_size(maps.shape[-2:], _tile_side(per_band))
    masks = coverage_mask(coverage, (tile_h, tile_w))
    tile_masks = None if masks is None else np.repeat(masks, subjects, axis=0)
    tiles = apply_colormap(normalise(upsample(maps.reshape(-1, *maps.shape[-2:]), (tile_h, tile_w)), tile_masks),
                           colormap)
    tiles = tiles.reshape(count, subjects, tile_h, tile_w, 3)
    small = fit_picture(picture, (tile_h, tile_w)) if picture is not None else None

    size = 18
    face, header_face = font(size), font(13)
    gap, margin = 2, 8
    label_w = max(text_size(label, face)[0] for label in labels) + 2 * margin
    title_h = size + 2 * margin if title else 0
    header_h = 13 + margin
    band_h = header_h + subjects * (tile_h + gap) + margin
    width = label_w + per_band * (tile_w + gap) + margin
    height = title_h + bands * band_h + 24
    canvas = Image.new("RGB", (width, height), (28, 28, 28))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin, margin), title, font=face, fill=(255, 255, 255))
    widest = max(text_size(str(s), header_face)[0] for s in steps) + 6
    every = max(1, math.ceil(widest / (tile_w + gap)))  # label every k-th column when numbers would collide
    for band in range(bands):
        band_top = title_h + band * band_h
        columns = range(band * per_band, min(count, (band + 1) * per_band))
        for column, index in enumerate(columns):
            if column % every == 0:
                text = str(steps[index])
                x = label_w + column * (tile_w + gap) + (tile_w - text_size(text, header_face)[0]) // 2
                draw.text((x, band_top), text, font=header_face, fill=(200, 200, 200))
        for row, label in enumerate(labels):
            y = band_top + header_h + row * (tile_h + gap)
            draw.text((margin, y + (tile_h - size) // 2), label, font=face, fill=(255, 255, 255))
            for column, index in enumerate(columns):
                tile = blend(tiles[index, row], small, opacity, None if masks is None else masks[index])
                canvas.paste(_to_pil(tile), (label_w + column * (tile_w + gap), y))
    footer = "columns: sampling step; each tile normalised to its own min..max"
    draw.text((margin, height - 20), footer, font=header_face, fill=(170, 170, 170))
    return _from_pil(canvas)


# ---------------------------------------------------------------- overlap

def subject_colour(index: int) -> np.ndarray:
    return SUBJECT_COLOURS[index % len(SUBJECT_COLOURS)]


def render_overlap(maps, labels: list[str], picture: np.ndarray | None = None, opacity: float = 0.6,
                   detail: str = "", long_side: int = 512, coverage=None) -> np.ndarray:
    """All subjects in one picture: each normalised map tints its own colour, colours add up (red and
    green make yellow where both subjects attend the same pixels). coverage: [h, w], 1 where the maps
    hold attention, or None for everywhere. Returns [H, W, 3]."""
    maps = np.asarray(maps.detach().cpu().float() if isinstance(maps, torch.Tensor) else maps, np.float32)
    size = picture.shape[:2] if picture is not None else display_size(maps.shape[-2:], long_side)
    mask = coverage_mask(coverage, size)
    strength = np.clip(normalise(upsample(maps, size), mask), 0.0, 1.0)
    colours = np.stack([subject_colour(i) for i in range(len(labels))])
    mixed = np.clip(np.einsum("shw,sc->hwc", strength, colours), 0.0, 1.0)
    canvas = _to_pil(blend(mixed, picture, opacity, mask))

    size_px = label_size(*canvas.size[::-1])
    face, small = font(size_px), font(_detail_size(size_px))
    pad = max(3, size_px // 4)
    lines = [(label, tuple(int(v * 255) for v in subject_colour(i))) for i, label in enumerate(labels)]
    note = detail or "overlap = mixed colour"
    box_w = min(canvas.width, max(max(text_size(t, face)[0] for t, _ in lines) + size_px + 3 * pad,
                                  text_size(note, small)[0] + 2 * pad))
    box_h = pad + len(lines) * (size_px + pad) + _detail_size(size_px) + pad
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rounded_rectangle((0, 0, box_w, box_h), radius=pad, fill=(0, 0, 0, 170))
    y = pad
    for text, colour in lines:
        draw.rectangle((pad, y + 2, pad + size_px - 4, y + size_px - 2), fill=colour + (255,))
        draw.text((2 * pad + size_px - 2, y), text, font=face, fill=(255, 255, 255, 255))
        y += size_px + pad
    draw.text((pad, y), note, font=small, fill=(220, 220, 220, 255))
    base = canvas.convert("RGBA")
    base.alpha_composite(overlay)
    return _from_pil(base)


# ---------------------------------------------------------------- binding (attribute maps beside their nouns)

BINDING_GAP = 4  # dark pixels between the panels of the binding grid
_GAP_COLOUR = (28, 28, 28)


def render_binding(noun_maps, attribute_maps, disagreement, captions, colormap: str,
                   picture: np.ndarray | None = None, opacity: float = 0.6, long_side: int = 512,
                   coverage=None) -> np.ndarray:
    """A grid with one row per noun-attribute pair: the noun's map, the attribute's map and where they disagree.

    noun_maps, attribute_maps: [P, h, w] raw attention, each panel stretched to its own min..max as in
    render_heatmaps. disagreement: [P, h, w] in 0..1, drawn on that fixed scale (0 = the cold end, not
    stretched), so a pair whose maps agree stays cold. captions: per pair three (title, detail), for the
    noun, attribute and disagreement panels. picture / long_side / coverage as in render_heatmaps; every
    panel has the picture's size (H, W). Returns [P * H + (P - 1) * BINDING_GAP, 3 * W + 2 * BINDING_GAP, 3].
    """
    def array(maps):
        return np.asarray(maps.detach().cpu().float() if isinstance(maps, torch.Tensor) else maps, np.float32)

    noun_maps, attribute_maps, disagreement = array(noun_maps), array(attribute_maps), array(disagreement)
    pairs = noun_maps.shape[0]
    size = picture.shape[:2] if picture is not None else display_size(noun_maps.shape[-2:], long_side)
    mask = coverage_mask(coverage, size)
    heat = apply_colormap(normalise(upsample(np.concatenate([noun_maps, attribute_maps]), size), mask), colormap)
    apart = apply_colormap(np.clip(upsample(disagreement, size), 0.0, 1.0), colormap)
    height, width = size
    canvas = Image.new("RGB", (3 * width + 2 * BINDING_GAP, pairs * height + (pairs - 1) * BINDING_GAP), _GAP_COLOUR)
    for row in range(pairs):
        panels = (heat[row], heat[pairs + row], apart[row])
        for column, (colour, (title, detail)) in enumerate(zip(panels, captions[row])):
            panel = _to_pil(blend(colour, picture, opacity, mask))
            draw_caption(panel, title, detail, colormap, bar_labels=("0", "peak") if column == 2 else ("min", "max"))
            canvas.paste(panel, (column * (width + BINDING_GAP), row * (height + BINDING_GAP)))
    return _from_pil(canvas)


# ---------------------------------------------------------------- loss plot

def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering low..high."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) if low else 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-6:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


# The loss plot's legend: the papers' names for the guidance's loss keys (an unknown key is shown with spaces).
LOSS_LABELS = {
    "attend_and_excite": "Attend-and-Excite",
    "segregation": "A-STAR segregation",
    "retention": "A-STAR retention",
    "attendance": "Divide & Bind attendance",
    "divide_and_bind_binding": "Divide & Bind binding",
    "syngen": "SynGen",
    "conform": "CONFORM",
}


def loss_label(name: str) -> str:
    """The legend text of loss term `name`: 'syngen' -> 'SynGen', 'my_new_loss' -> 'my new loss'."""
    return LOSS_LABELS.get(name, name.replace("_", " "))


def _format(value: float) -> str:
    return f"{value:.3g}"


def render_loss_plot(losses, batch_index: int = 0, total_steps: int = 0, size: tuple[int, int] = (540, 960),
                     title: str = "") -> np.ndarray:
    """Loss against sampling step for one image of the batch: the weighted total (black, thick), each
    loss term (coloured, unweighted; every key of the steps' `terms`, named by `loss_label`), and
    refinement iterations (violet crosses between a step and the next, in iteration order, joined to
    the step's first loss by a thin line).

    losses: StepLoss-like objects (step, terms {name: [per image]}, total [per image],
    refinement [[per image] per iteration]). Returns [H, W, 3].
    """
    height, width = size
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    face, small = font(16), font(13)
    names: list[str] = []
    for entry in losses:
        names.extend(n for n in entry.terms if n not in names)

    def value(values):
        return float(values[batch_index])

    points_total = [(entry.step, value(entry.total)) for entry in losses]
    points_terms = {n: [(e.step, value(e.terms[n])) for e in losses if n in e.terms] for n in names}
    refinements = []
    for entry in losses:
        count = len(entry.refinement)
        for k, values in enumerate(entry.refinement):
            refinements.append((entry.step, entry.step + 0.85 * (k + 1) / (count + 1), value(values)))

    ys = [y for _, y in points_total] + [y for pts in points_terms.values() for _, y in pts]
    ys += [y for _, _, y in refinements]
    ys = [y for y in ys if math.isfinite(y)] or [0.0, 1.0]
    spread = max(ys) - min(ys)
    margin = 0.08 * spread if spread > 0 else 0.05 * max(abs(max(ys)), 1e-3)
    low = min(ys) - margin
    y_ticks = nice_ticks(max(0.0, low) if min(ys) >= 0 else low, max(ys) + margin)
    steps = [s for s, _ in points_total]
    x_low = 0
    x_high = max(total_steps, max(steps) + 1)
    x_ticks = nice_ticks(x_low, x_high, 8)
    x_ticks = [int(t) for t in x_ticks if float(t).is_integer() and x_low <= t <= x_high] or [x_low, x_high]

    left, right, top, bottom = 78, width - 24, 48, height - 58
    legend = [("total (weighted)", (0, 0, 0))]
    legend += [(loss_label(n), _TERM_COLOURS[i % len(_TERM_COLOURS)]) for i, n in enumerate(names)]
    if refinements:
        legend.append((f"refinement iteration ({len(refinements)})", _REFINEMENT_COLOUR))
    legend_w = max(text_size(t, small)[0] for t, _ in legend) + 40
    right -= legend_w + 12

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_low) / (x_high - x_low)
        fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for t in y_ticks:
        _, y = px(x_low, t)
        draw.line((left, y, right, y), fill=(230, 230, 230))
        text = _format(t)
        draw.text((left - 8 - text_size(text, small)[0], y - 8), text, font=small, fill=(40, 40, 40))
    for t in x_ticks:
        x, _ = px(t, y_ticks[0])
        draw.line((x, top, x, bottom), fill=(238, 238, 238))
        draw.line((x, bottom, x, bottom + 5), fill=(40, 40, 40))
        text = str(t)
        draw.text((x - text_size(text, small)[0] / 2, bottom + 8), text, font=small, fill=(40, 40, 40))
    draw.rectangle((left, top, right, bottom), outline=(60, 60, 60))
    draw.text(((left + right) / 2 - text_size("sampling step", face)[0] / 2, height - 30), "sampling step",
              font=face, fill=(20, 20, 20))
    ylabel = Image.new("RGBA", (text_size("loss", face)[0] + 4, 22), (255, 255, 255, 0))
    ImageDraw.Draw(ylabel).text((0, 0), "loss", font=face, fill=(20, 20, 20, 255))
    ylabel = ylabel.rotate(90, expand=True)
    canvas.paste(ylabel, (14, int((top + bottom) / 2 - ylabel.height / 2)), ylabel)
    if title:
        draw.text((left, 14), title, font=face, fill=(20, 20, 20))

    def polyline(points, colour, line_width, marker):
        pixels = [px(x, y) for x, y in points if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=line_width, joint="curve")
        for x, y in pixels:
            draw.ellipse((x - marker, y - marker, x + marker, y + marker), fill=colour)

    polyline(points_total, (0, 0, 0), 5, 4)
    for i, name in enumerate(names):
        polyline(points_terms[name], _TERM_COLOURS[i % len(_TERM_COLOURS)], 2, 2.5)
    by_step: dict[int, list] = {}
    for step, x, y in refinements:
        by_step.setdefault(step, []).append((x, y))
    first = dict(points_total)
    for step, pts in by_step.items():
        path = [px(step, first[step])] + [px(x, y) for x, y in pts if math.isfinite(y)]
        draw.line(path, fill=_REFINEMENT_COLOUR, width=1)
        for x, y in path[1:]:
            draw.line((x - 4, y - 4, x + 4, y + 4), fill=_REFINEMENT_COLOUR, width=2)
            draw.line((x - 4, y + 4, x + 4, y - 4), fill=_REFINEMENT_COLOUR, width=2)

    lx, ly = right + 14, top
    draw.rectangle((lx, ly, lx + legend_w, ly + 10 + 20 * len(legend)), outline=(180, 180, 180), fill=(252, 252, 252))
    for i, (text, colour) in enumerate(legend):
        y = ly + 8 + 20 * i
        if colour == _REFINEMENT_COLOUR:
            draw.line((lx + 10, y + 3, lx + 20, y + 13), fill=colour, width=2)
            draw.line((lx + 10, y + 13, lx + 20, y + 3), fill=colour, width=2)
        else:
            draw.line((lx + 6, y + 8, lx + 26, y + 8), fill=colour, width=5 if i == 0 else 2)
        draw.text((lx + 32, y), text, font=small, fill=(20, 20, 20))
    return _from_pil(canvas)
