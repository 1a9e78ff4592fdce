"""Procedural scenes of one to three flat shapes, their captions, held-out splits and renders.

A scene lives on the model's latent grid (GRID x GRID latent pixels; the VAE shows each latent pixel as an
8 x 8 block of the 256 px picture). Each object is a (colour, shape) with a centre and a half-size in latent
pixels; objects of one scene have distinct colours and distinct shapes, and their bounding boxes keep
MIN_GAP latent pixels apart (no overlap, no touching). Captions follow the Attend-and-Excite objects
prompts: "a red circle", "a red circle and a blue square", "a red circle, a blue square and a green
triangle" (objects in random order).

Held out of training: two colour-shape pairs (HELD_OUT_PAIRS, never drawn in a training scene) and four
two-object combinations of seen pairs (HELD_OUT_COMBOS, never together in a training scene). Everything
is drawn from numpy's default_rng seeded with (seed, index), so a scene depends only on its seed and
index, not on what was drawn before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

GRID = 32                      # latent pixels per side (256 px pictures through the VAE)
SUPERSAMPLE = 4                # sub-samples per latent pixel and side when rendering (anti-aliased edges)
MIN_HALF, MAX_HALF = 4.0, 7.0  # half-size of an object in latent pixels (8 to 14 across)
MIN_GAP = 2.0                  # latent pixels between the bounding boxes of two objects
MARGIN = 1.0                   # latent pixels between an object and the border

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.14),
    "green": (0.16, 0.68, 0.22),
    "blue": (0.16, 0.30, 0.90),
    "yellow": (0.96, 0.84, 0.14),
}
BACKGROUND = (0.5, 0.5, 0.5)   # latent 0
SHAPES = ("circle", "square", "triangle")
OBJECT_COUNT_PROBS = {1: 0.6, 2: 0.3, 3: 0.1}  # training scenes

HELD_OUT_PAIRS = frozenset({("blue", "triangle"), ("yellow", "circle")})
HELD_OUT_COMBOS = frozenset({
    frozenset({("red", "circle"), ("green", "square")}),
    frozenset({("blue", "square"), ("yellow", "triangle")}),
    frozenset({("green", "triangle"), ("red", "square")}),
    frozenset({("yellow", "square"), ("blue", "circle")}),
})

Pair = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cx: float    # centre, latent pixels from the left
    cy: float    # centre, latent pixels from the top
    half: float  # half of the side (square, triangle) or the radius (circle)

    @property
    def pair(self) -> Pair:
        return self.colour, self.shape


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    order: tuple[int, ...]  # caption order: indices into objects

    @property
    def caption(self) -> str:
        return caption([self.objects[i].pair for i in self.order])

    def token_positions(self) -> list[tuple[int, int]]:
        """Per object (in `objects` order): the CLIP token positions of its colour and its shape word in the
        tokenized caption (position 0 is the start token)."""
        positions = caption_token_positions(len(self.order))
        out = [(0, 0)] * len(self.objects)
        for slot, index in enumerate(self.order):
            out[index] = positions[slot]
        return out


def caption(pairs: list[Pair]) -> str:
    """'a red circle', 'a red circle and a blue square', 'a red circle, a blue square and a green triangle'."""
    names = [f"a {colour} {shape}" for colour, shape in pairs]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def caption_token_positions(count: int) -> list[tuple[int, int]]:
    """CLIP token positions (colour, shape) of each object slot of a `count`-object caption. Every colour and
    shape name is one CLIP token and ',' is its own: <start>(0) a(1) red(2) circle(3) [,|and](4) a(5) blue(6)
    square(7) [and](8) a(9) green(10) triangle(11)."""
    return [(4 * slot + 2, 4 * slot + 3) for slot in range(count)]


def other_shape(shape: str, step: int = 1) -> str:
    """The shape `step` places after `shape` in SHAPES (cyclic): a wrong shape word for a caption."""
    return SHAPES[(SHAPES.index(shape) + step) % len(SHAPES)]


def seen_pairs() -> list[Pair]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def is_training_scene(pairs) -> bool:
    pairs = list(pairs)
    if any(p in HELD_OUT_PAIRS for p in pairs):
        return False
    return not any(frozenset(two) in HELD_OUT_COMBOS for two in combinations(pairs, 2))


def two_object_prompts() -> dict[str, list[tuple[Pair, Pair]]]:
    """Every two-object prompt of distinct colours and distinct shapes, by split:
    'seen' (both pairs and their combination occur in training), 'held_out_combo' (seen pairs, never
    together in training), 'held_out_pair' (at least one pair never drawn in training). Sorted."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    out: dict[str, list[tuple[Pair, Pair]]] = {"seen": [], "held_out_combo": [], "held_out_pair": []}
    for a, b in combinations(pairs, 2):
        if a[0] == b[0] or a[1] == b[1]:
            continue
        if a in HELD_OUT_PAIRS or b in HELD_OUT_PAIRS:
            out["held_out_pair"].append((a, b))
        elif frozenset({a, b}) in HELD_OUT_COMBOS:
            out["held_out_combo"].append((a, b))
        else:
            out["seen"].append((a, b))
    return out


def _place(rng: np.random.Generator, count: int, tries: int = 100) -> list[tuple[float, float, float]] | None:
    boxes: list[tuple[float, float, float]] = []
    for _ in range(tries):
        if len(boxes) == count:
            break
        half = float(rng.uniform(MIN_HALF, MAX_HALF))
        low, high = MARGIN + half, GRID - MARGIN - half
        cx, cy = float(rng.uniform(low, high)), float(rng.uniform(low, high))
        if all(abs(cx - x) >= half + h + MIN_GAP or abs(cy - y) >= half + h + MIN_GAP for x, y, h in boxes):
            boxes.append((cx, cy, half))
    return boxes if len(boxes) == count else None


def sample_scene(seed: int, index: int, pairs: list[Pair] | None = None, split: str = "train") -> Scene:
    """Scene `index` of the stream `seed`. pairs: the objects to draw (any order; placed at random), else
    drawn: the count from OBJECT_COUNT_PROBS, distinct colours and shapes, only training combinations when
    split == 'train' (split 'any': all combinations)."""
    rng = np.random.default_rng([seed, index])
    while True:
        if pairs is None:
            count = int(rng.choice(list(OBJECT_COUNT_PROBS), p=list(OBJECT_COUNT_PROBS.values())))
            colours = rng.permutation(list(COLOURS))[:count]
            shapes = rng.permutation(list(SHAPES))[:count]
            drawn = [(str(c), str(s)) for c, s in zip(colours, shapes)]
            if split == "train" and not is_training_scene(drawn):
                continue
        else:
            drawn = list(pairs)
        boxes = _place(rng, len(drawn))
        if boxes is None:
            continue
        objects = tuple(SceneObject(c, s, x, y, h) for (c, s), (x, y, h) in zip(drawn, boxes))
        order = tuple(int(i) for i in rng.permutation(len(objects)))
        return Scene(objects, order)


def sample_scenes(seed: int, count: int, start: int = 0, split: str = "train") -> list[Scene]:
    return [sample_scene(seed, index, split=split) for index in range(start, start + count)]


# ---------------------------------------------------------------- rendering

_SHAPE_IDS = {name: i for i, name in enumerate(SHAPES)}


def object_coverage(scenes: list[Scene], grid: int = GRID, supersample: int = SUPERSAMPLE,
                    chunk: int = 128) -> np.ndarray:
    """[N, 3, grid, grid] float32: the share of each latent pixel each object covers (slot k = objects[k];
    absent slots 0). Vectorised over scenes and objects, `chunk` scenes at a time."""
    out = np.zeros((len(scenes), 3, grid, grid), np.float32)
    side = grid * supersample
    coords = (np.arange(side, dtype=np.float32) + 0.5) / supersample * (GRID / grid)
    y = coords[None, None, :, None]
    x = coords[None, None, None, :]
    for start in range(0, len(scenes), chunk):
        part = scenes[start:start + chunk]
        params = np.full((len(part), 3, 4), np.nan, np.float32)  # shape id, cx, cy, half
        for n, scene in enumerate(part):
            for k, obj in enumerate(scene.objects):
                params[n, k] = (_SHAPE_IDS[obj.shape], obj.cx, obj.cy, obj.half)
        shape, cx, cy, half = (params[..., i][..., None, None] for i in range(4))
        dx, dy = x - cx, y - cy
        circle = dx * dx + dy * dy <= half * half
        square = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        # isosceles, apex up: apex (cx, cy - half), base from cx - half to cx + half at cy + half
        triangle = (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
        inside = np.where(shape == 0, circle, np.where(shape == 1, square, np.where(shape == 2, triangle, False)))
        cover = inside.reshape(len(part), 3, grid, supersample, grid, supersample).mean(axis=(3, 5))
        out[start:start + len(part)] = cover
    return out


def render(scenes: list[Scene], grid: int = GRID, supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """RGB pictures [N, grid, grid, 3] in 0..1 (anti-aliased) and the object coverage [N, 3, grid, grid]."""
    cover = object_coverage(scenes, grid, supersample)
    colours = np.zeros((len(scenes), 3, 3), np.float32)
    for n, scene in enumerate(scenes):
        for k, obj in enumerate(scene.objects):
            colours[n, k] = COLOURS[obj.colour]
    background = np.asarray(BACKGROUND, np.float32)
    image = background * (1 - cover.sum(axis=1))[..., None] + np.einsum("nkhw,nkc->nhwc", cover, colours)
    return image.astype(np.float32), cover


# ---------------------------------------------------------------- pixel <-> latent (the VAE's fixed map)

def rgb_to_latent(image: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] RGB in 0..1 on the latent grid -> [N, 4, H, W] model-space latent (what the UNet sees:
    the VAE's latent times SD1.x's 0.18215): channels 0-2 = 2 * (rgb - 0.5), channel 3 = 0."""
    latent = np.zeros((image.shape[0], 4, *image.shape[1:3]), np.float32)
    latent[:, :3] = np.moveaxis(image, -1, 1) * 2 - 1
    return latent


def latent_to_rgb(latent: np.ndarray) -> np.ndarray:
    """The inverse of rgb_to_latent: [N, 4, H, W] model-space latent -> [N, H, W, 3] RGB (clipped to 0..1)."""
    return np.clip(np.moveaxis(np.asarray(latent)[:, :3], 1, -1) / 2 + 0.5, 0, 1).astype(np.float32)
