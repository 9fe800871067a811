"""The SUR world: a tiny, offline stand-in for Lexica/SURD.

What stands for what
--------------------
The paper studies three kinds of semantics in short narrative prompts: counting, colour and
action. In this world a scene is a few copies of ONE object class drawn on a plain gray
background:

* **object class** = (colour, shape): 7 colours (``COLORS``) x 3 shapes (``SHAPES``);
* **counting**: 1 to ``MAX_COUNT`` (6) objects;
* **action** becomes an **arrangement** verb: ``row`` (a horizontal line), ``stack`` (a
  vertical column), ``ring`` or ``scattered``. An arrangement needs at least
  ``MIN_ARRANGED`` (3) objects: one object has no arrangement, and two objects are always a
  line, so scenes with 1 or 2 objects have ``arrangement=None`` (the objects are placed at
  random without overlap);
* **everyday nouns** whose look needs commonsense (``NOUNS``): a tomato is a red circle, a
  lime a green circle, a die a white square, a pine tree a green triangle. Nouns are split
  into TRAIN nouns (the only ones in SURD-mini, i.e. in adapter training) and HELD-OUT nouns
  (only in the test prompts). Every held-out noun's class is also the class of a train noun
  and is drawn in pretraining from its complex (explicit) prompt, so the base model can
  render it; only the word is new, and knowing what it looks like is the LLM's job.
* **quality**: complex prompts with quality tags ("masterpiece, best quality, sharp focus")
  go with clean renders, prompts without them with degraded renders (blur and/or noise),
  so "complex prompts give better images" is true in the data, as it is on Lexica.

Two prompt writers describe the same scene:

* ``complex_prompt``: keyword style, explicit ("4 red circles, horizontal row, gray
  background, masterpiece, best quality, sharp focus"), long-tailed in length;
* ``simple_prompt``: a short narrative with a number word and an everyday noun, the
  arrangement as a verb phrase and the colour and shape left implicit ("four tomatoes lined
  up on a table"). Its phrasing templates are split into train and held-out ones too.

Geometry
--------
Positions and sizes are fractions of the canvas, so a scene can be drawn at any size; the
constants below are given in "pixels at 32 x 32" (``*_PX32``). Objects are 5-7 px wide
(drawn uniformly per scene, all objects of a scene the same size), except where the canvas
forbids it (``max_object_size``): six objects in a row (or stack) with gaps of at least
``ROW_GAP_PX32`` = 1.25 px fit in 32 px only if they are at most 4.1 px wide (rows/stacks
of 5: 5.2 px; rings of 6: 5.4 px; rings of 5: 6.3 px). So in this world, large counts in
lines also mean small objects. Squares are axis-aligned and triangles point up.

Images are rendered at ``SUPERSAMPLE`` (4) times the size and box-downsampled, so edges are
anti-aliased and sizes and positions are sub-pixel exact. Placement is bounded: rejection
sampling with a fixed number of tries and restarts, each restart shrinking the objects a
little; it raises instead of looping forever. Rows, stacks and rings are built well inside
the tolerances of ``arrangement_of`` (the world's definition of each arrangement), and
scattered layouts are redrawn until they are clearly none of the other three.

Everything random comes from a ``numpy.random.Generator`` passed in, so a seed fixes every
image and prompt. ``python -m sur_lib.world.toyworld build DIR --n N --seed S`` writes SURD-mini.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

# --------------------------------------------------------------------------- the world
SIZE = 32  # default image side in pixels
SUPERSAMPLE = 4  # render at 4x, then average 4x4 blocks (anti-aliasing)
BACKGROUND = (128, 128, 128)

# Colours: well apart in hue (and white, which has none). Directions from the gray
# background differ by >= 30 degrees in RGB, which is what the judge separates.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 175, 70),
    "blue": (45, 95, 230),
    "purple": (150, 60, 205),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")  # squares axis-aligned, triangles apex up
ARRANGEMENTS = ("row", "stack", "ring", "scattered")
MAX_COUNT = 6
MIN_ARRANGED = 3  # scenes with fewer objects have no arrangement
QUALITIES = ("clean", "degraded")

# Geometry, in pixels at 32 x 32 (scaled with the image size).
OBJECT_SIZE_PX32 = (5.0, 7.0)  # side of an object's bounding box, drawn uniformly
MIN_OBJECT_SIZE_PX32 = 3.5  # restarts never shrink objects below this
MARGIN_PX32 = 0.5  # free border around the canvas
ROW_GAP_PX32 = 1.25  # min gap between neighbours in a row / stack / ring
SCATTER_GAP_PX32 = 2.0  # min gap between scattered objects (bounding boxes)
ROW_JITTER_PX32 = 0.5  # a row's objects move up/down by at most this
ROW_TOL_PX32 = 2.0  # a row: every centre within this of the row's median line
RING_MIN_RADIUS_PX32 = 5.0  # a ring: mean distance from the centre at least this ...
RING_TOL = 0.25  # ... and (max - min distance) <= RING_TOL * mean distance
SCATTER_SLACK = 1.5  # scattered layouts must stay scattered with 1.5x looser tolerances

# Degradation of renders that go with prompts without quality tags (pixels at 32 x 32).
BLUR_SIGMA_PX32 = (0.5, 0.8)  # Gaussian blur sigma
NOISE_STD = (6.0, 14.0)  # Gaussian noise std in 0-255 units
P_CLEAN = 0.75  # share of complex prompts with quality tags (clean renders)

_U = 1.0 / 32.0  # one "pixel at 32" as a fraction of the canvas


class NounInfo(NamedTuple):
    plural: str
    color: str
    shape: str
    split: str  # "train" or "heldout"


# Everyday nouns and the look commonsense gives them. "heldout" nouns never appear in
# SURD-mini; each one shares its class with at least one train noun.
NOUNS: dict[str, NounInfo] = {
    # red
    "tomato": NounInfo("tomatoes", "red", "circle", "train"),
    "cranberry": NounInfo("cranberries", "red", "circle", "train"),
    "cherry": NounInfo("cherries", "red", "circle", "heldout"),
    "brick": NounInfo("bricks", "red", "square", "train"),
    # orange
    "orange": NounInfo("oranges", "orange", "circle", "train"),
    "pumpkin": NounInfo("pumpkins", "orange", "circle", "train"),
    "tangerine": NounInfo("tangerines", "orange", "circle", "heldout"),
    "basketball": NounInfo("basketballs", "orange", "circle", "heldout"),
    "traffic cone": NounInfo("traffic cones", "orange", "triangle", "train"),
    # yellow
    "lemon": NounInfo("lemons", "yellow", "circle", "train"),
    "egg yolk": NounInfo("egg yolks", "yellow", "circle", "heldout"),
    "sponge": NounInfo("sponges", "yellow", "square", "train"),
    "sticky note": NounInfo("sticky notes", "yellow", "square", "heldout"),
    "pyramid": NounInfo("pyramids", "yellow", "triangle", "train"),
    "cheese wedge": NounInfo("cheese wedges", "yellow", "triangle", "heldout"),
    # green
    "lime": NounInfo("limes", "green", "circle", "train"),
    "pea": NounInfo("peas", "green", "circle", "train"),
    "olive": NounInfo("olives", "green", "circle", "heldout"),
    "pine tree": NounInfo("pine trees", "green", "triangle", "train"),
    "christmas tree": NounInfo("christmas trees", "green", "triangle", "heldout"),
    # blue, purple
    "blueberry": NounInfo("blueberries", "blue", "circle", "train"),
    "grape": NounInfo("grapes", "purple", "circle", "train"),
    "plum": NounInfo("plums", "purple", "circle", "heldout"),
    # white
    "snowball": NounInfo("snowballs", "white", "circle", "train"),
    "golf ball": NounInfo("golf balls", "white", "circle", "train"),
    "pearl": NounInfo("pearls", "white", "circle", "heldout"),
    "die": NounInfo("dice", "white", "square", "train"),
    "sugar cube": NounInfo("sugar cubes", "white", "square", "heldout"),
}
TRAIN_NOUNS = tuple(n for n, info in NOUNS.items() if info.split == "train")
HELDOUT_NOUNS = tuple(n for n, info in NOUNS.items() if info.split == "heldout")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# Simple-prompt phrasings. "{num}" is a number word, "{nouns}" the plural, "{a_noun}" the
# singular with its article. Keys: "single" (1 object), "count" (>= 2 objects, arrangement
# not mentioned), or an arrangement (>= 3 objects). Held-out phrasings only appear in the
# test prompts; each contains words no train phrasing has.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "single": ("{a_noun} on a table", "a single {noun}", "one {noun} on a plate",
                   "a photo of {a_noun}", "{a_noun}"),
        "count": ("{num} {nouns} on a table", "{num} {nouns}", "a photo of {num} {nouns}",
                  "{num} {nouns} on a plate", "there are {num} {nouns}"),
        "row": ("{num} {nouns} lined up on a table", "{num} {nouns} in a row",
                "a row of {num} {nouns}", "{num} {nouns} side by side"),
        "stack": ("a stack of {num} {nouns}", "{num} {nouns} stacked on top of each other",
                  "{num} {nouns} piled up"),
        "ring": ("{num} {nouns} in a circle", "{num} {nouns} arranged in a ring",
                 "a ring of {num} {nouns}"),
        "scattered": ("{num} {nouns} scattered on a field", "{num} {nouns} scattered around",
                      "{num} {nouns} lying here and there"),
    },
    "heldout": {
        "single": ("just one {noun} by itself",),
        "count": ("exactly {num} {nouns}", "a group of {num} {nouns}",
                  "{num} {nouns} waiting on the kitchen counter"),
        "row": ("{num} {nouns} standing in a straight line",
                "{num} {nouns} queued up one after another"),
        "stack": ("a tower of {num} {nouns}", "{num} {nouns} balanced one above the other"),
        "ring": ("{num} {nouns} forming a loop", "{num} {nouns} arranged like a wreath"),
        "scattered": ("{num} {nouns} strewn all over the place",
                      "{num} {nouns} tossed about at random"),
    },
}

# Complex-prompt vocabulary.
ARRANGEMENT_TAGS = {
    "row": ("horizontal row", "in a row", "lined up horizontally"),
    "stack": ("vertical stack", "stacked vertically", "vertical column"),
    "ring": ("ring", "ring formation", "ring layout"),
    "scattered": ("scattered", "random placement", "scattered layout"),
}
BACKGROUND_TAGS = ("gray background", "plain gray background", "grey backdrop")
CORE_QUALITY_TAGS = ("masterpiece", "best quality", "sharp focus")
EXTRA_QUALITY_TAGS = (
    "highly detailed", "4k", "8k", "ultra hd", "hdr", "crisp edges", "clean lines",
    "high resolution", "trending on artstation", "award winning", "professional",
    "studio quality", "smooth shading", "octane render", "unreal engine", "intricate",
    "sharp", "perfect composition", "rich colors", "vivid",
)
STYLE_TAGS = (  # neutral: say nothing about quality, may go with any render
    "digital art", "illustration", "minimalism", "flat design", "simple shapes",
    "geometric", "2d", "toy world", "centered", "vector art", "flat colors", "icon",
    "abstract", "still life", "overhead view", "symmetry", "pop art", "clip art",
)


# --------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    """What a prompt asks for and a render shows: ``count`` copies of (color, shape).

    ``arrangement`` is one of ``ARRANGEMENTS`` or None (unspecified: objects placed at
    random) when count >= 3, and always None for 1-2 objects; sampled scenes of 3+ objects
    always have one. ``noun`` is the
    everyday noun the simple prompt uses (None for abstract pretraining scenes).
    ``quality`` is "clean" or "degraded".
    """

    count: int
    color: str
    shape: str
    arrangement: str | None = None
    noun: str | None = None
    quality: str = "clean"

    def __post_init__(self):
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be 1..{MAX_COUNT}, got {self.count}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {list(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {list(SHAPES)}")
        if self.count >= MIN_ARRANGED:
            if self.arrangement is not None and self.arrangement not in ARRANGEMENTS:
                raise ValueError(f"arrangement must be None or one of {ARRANGEMENTS}, "
                                 f"got {self.arrangement!r}")
        elif self.arrangement is not None:
            raise ValueError(f"scenes of fewer than {MIN_ARRANGED} objects have no "
                             f"arrangement, got {self.arrangement!r}")
        if self.noun is not None:
            info = NOUNS.get(self.noun)
            if info is None:
                raise ValueError(f"unknown noun {self.noun!r}")
            if (info.color, info.shape) != (self.color, self.shape):
                raise ValueError(f"a {self.noun} is a {info.color} {info.shape}, "
                                 f"not a {self.color} {self.shape}")
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {self.quality!r}")


class Obj(NamedTuple):
    """One drawn object: bounding-box centre (x, y) and side ``s``, as canvas fractions."""

    x: float
    y: float
    s: float
    color: str
    shape: str


def sample_scene(rng: np.random.Generator, nouns: Sequence[str] | None = TRAIN_NOUNS,
                 p_clean: float = P_CLEAN) -> Scene:
    """A random scene: count uniform in 1..6, arrangement uniform when count >= 3.

    With ``nouns`` the class comes from a noun drawn uniformly from them; with
    ``nouns=None`` it is drawn uniformly from all 7 x 3 classes and the scene has no noun
    (pretraining scenes). The render is clean with probability ``p_clean``.
    """
    count = int(rng.integers(1, MAX_COUNT + 1))
    if nouns is None:
        noun = None
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
    else:
        noun = nouns[int(rng.integers(len(nouns)))]
        color, shape = NOUNS[noun].color, NOUNS[noun].shape
    arrangement = ARRANGEMENTS[int(rng.integers(4))] if count >= MIN_ARRANGED else None
    quality = "clean" if rng.random() < p_clean else "degraded"
    return Scene(count, color, shape, arrangement, noun, quality)


# --------------------------------------------------------------------------- geometry
def arrangement_of(points, slack: float = 1.0) -> str | None:
    """The arrangement that object centres ``points`` ([n, 2] canvas fractions) form.

    This is the world's definition, used both to build layouts and by the judge:

    * fewer than 3 points: None;
    * ``row``: every centre within ``ROW_TOL_PX32`` (2 px at 32) of the median height;
    * ``stack``: the same for the horizontal position;
    * ``ring``: distances r_i from the mean centre have mean >= ``RING_MIN_RADIUS_PX32``
      (5 px) and max(r) - min(r) <= ``RING_TOL`` (25%) of the mean;
    * ``scattered``: anything else.

    ``slack`` multiplies the tolerances (the renderer draws scattered layouts that stay
    scattered at 1.5x, so the judge never sits on a boundary).
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) < MIN_ARRANGED:
        return None
    tol = ROW_TOL_PX32 * _U * slack
    if np.max(np.abs(p[:, 1] - np.median(p[:, 1]))) <= tol:
        return "row"
    if np.max(np.abs(p[:, 0] - np.median(p[:, 0]))) <= tol:
        return "stack"
    r = np.linalg.norm(p - p.mean(axis=0), axis=1)
    if r.mean() >= RING_MIN_RADIUS_PX32 * _U / slack and np.ptp(r) <= RING_TOL * slack * r.mean():
        return "ring"
    return "scattered"


def max_object_size(arrangement: str | None, count: int) -> float:
    """Largest object side (canvas fraction) with which ``count`` objects fit the layout."""
    hi = OBJECT_SIZE_PX32[1] * _U
    free = 1.0 - 2 * MARGIN_PX32 * _U
    if arrangement in ("row", "stack"):
        return min(hi, (free - (count - 1) * ROW_GAP_PX32 * _U) / count)
    if arrangement == "ring":
        # Neighbours' boxes must keep the gap g: centres at least sqrt(2) (s + g) apart, also
        # after the angle (+-0.05 rad) and radius (+-0.3 px) jitter; the ring (centre jitter
        # 1 px) must stay on the canvas: R + s / sqrt(2) <= 1/2 - margin - 1 px.
        k = 2 * math.sin(math.pi / count - 0.05)
        g = ROW_GAP_PX32 * _U
        room = 0.5 - (MARGIN_PX32 + 1.3) * _U - math.sqrt(2) * g / k
        return min(hi, room / (math.sqrt(2) / k + math.sqrt(2) / 2))
    return hi


def _ring_radius_range(s: float, n: int) -> tuple[float, float]:
    k = 2 * math.sin(math.pi / n - 0.05)
    r_lo = max(math.sqrt(2) * (s + ROW_GAP_PX32 * _U) / k + 0.3 * _U,
               (RING_MIN_RADIUS_PX32 + 1.5) * _U)
    r_hi = 0.5 - (MARGIN_PX32 + 1.0) * _U - s * math.sqrt(2) / 2
    return r_lo, r_hi


def _line(rng, n: int, s: float, vertical: bool):
    free_lo, free_hi = MARGIN_PX32 * _U + s / 2, 1 - MARGIN_PX32 * _U - s / 2
    pitch_lo = s + ROW_GAP_PX32 * _U
    pitch_hi = min(s + 6 * _U, (free_hi - free_lo) / (n - 1))
    pitch = rng.uniform(pitch_lo, max(pitch_lo, pitch_hi))
    start = rng.uniform(free_lo, max(free_lo, free_hi - (n - 1) * pitch))
    along = start + pitch * np.arange(n)
    jit = min(0.25 * _U, (pitch - pitch_lo) / 2)
    along = along + rng.uniform(-jit, jit, n)
    across0 = rng.uniform(max(0.25, free_lo + ROW_JITTER_PX32 * _U),
                          min(0.75, free_hi - ROW_JITTER_PX32 * _U))
    across = across0 + rng.uniform(-ROW_JITTER_PX32 * _U, ROW_JITTER_PX32 * _U, n)
    pts = np.stack([across, along], 1) if vertical else np.stack([along, across], 1)
    return pts


def _ring(rng, n: int, s: float):
    r_lo, r_hi = _ring_radius_range(s, n)
    radius = rng.uniform(r_lo, max(r_lo, min(r_hi, r_lo + 4 * _U)))
    centre = 0.5 + rng.uniform(-1.0, 1.0, 2) * _U
    theta = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(n) / n
    theta = theta + rng.uniform(-0.05, 0.05, n)
    rad = radius + rng.uniform(-0.3, 0.3, n) * _U
    return centre + np.stack([rad * np.cos(theta), rad * np.sin(theta)], 1)


def _scatter(rng, n: int, s: float, tries: int = 200):
    lo, hi = MARGIN_PX32 * _U + s / 2, 1 - MARGIN_PX32 * _U - s / 2
    need = s + SCATTER_GAP_PX32 * _U  # Chebyshev distance between centres
    pts: list[np.ndarray] = []
    for _ in range(n):
        for _ in range(tries):
            p = rng.uniform(lo, hi, 2)
            if all(np.max(np.abs(p - q)) >= need for q in pts):
                pts.append(p)
                break
        else:
            return None
    return np.array(pts)


def _fits(pts: np.ndarray, s: float, gap: float) -> bool:
    lo, hi = MARGIN_PX32 * _U + s / 2 - 1e-9, 1 - MARGIN_PX32 * _U - s / 2 + 1e-9
    if np.any(pts < lo) or np.any(pts > hi):
        return False
    d = np.max(np.abs(pts[:, None] - pts[None]), axis=-1)  # Chebyshev: boxes apart
    np.fill_diagonal(d, np.inf)
    return bool(np.all(d >= s + gap - 1e-9))


def place(scene: Scene, rng: np.random.Generator, max_restarts: int = 50) -> list[Obj]:
    """Object positions and size for ``scene``: bounded rejection sampling.

    Draws the object side uniformly in ``OBJECT_SIZE_PX32`` (capped by
    ``max_object_size``), builds the layout, and checks that boxes keep their gaps, stay on
    the canvas and that ``arrangement_of`` gives the scene's arrangement. A failed attempt
    restarts with objects 5% smaller (never below ``MIN_OBJECT_SIZE_PX32``); after
    ``max_restarts`` it raises RuntimeError rather than loop forever.
    """
    n, arr = scene.count, scene.arrangement
    cap = max_object_size(arr, n)
    s = min(cap, rng.uniform(*OBJECT_SIZE_PX32) * _U)
    for _ in range(max_restarts):
        if arr in ("row", "stack"):
            pts, gap = _line(rng, n, s, vertical=arr == "stack"), ROW_GAP_PX32 * _U
        elif arr == "ring":
            pts, gap = _ring(rng, n, s), ROW_GAP_PX32 * _U
        else:
            pts, gap = _scatter(rng, n, s), SCATTER_GAP_PX32 * _U
        if pts is not None and _fits(pts, s, gap):
            if arr is None:  # unspecified (or 1-2 objects): any layout
                ok = True
            elif arr == "scattered":
                ok = arrangement_of(pts, SCATTER_SLACK) == "scattered"
            else:
                ok = arrangement_of(pts) == arr
            if ok:
                return [Obj(float(x), float(y), float(s), scene.color, scene.shape)
                        for x, y in pts]
        s = max(MIN_OBJECT_SIZE_PX32 * _U, s * 0.95)
    raise RuntimeError(f"could not place {scene} in {max_restarts} restarts")


# --------------------------------------------------------------------------- drawing
def coverage(shape: str, x: float, y: float, s: float, size: int) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage (0..1) of one shape: (row slice, column slice, [h, w] array).

    The shape is tested at SUPERSAMPLE x SUPERSAMPLE points per pixel and averaged, which
    is exactly "render at 4x, then box-downsample".
    """
    k = SUPERSAMPLE
    half = s / 2
    c0, c1 = max(0, int(math.floor((x - half) * size))), min(size, int(math.ceil((x + half) * size)))
    r0, r1 = max(0, int(math.floor((y - half) * size))), min(size, int(math.ceil((y + half) * size)))
    xs = (np.arange(c0 * k, c1 * k) + 0.5) / (size * k)
    ys = (np.arange(r0 * k, r1 * k) + 0.5) / (size * k)
    dx, dy = xs[None, :] - x, ys[:, None] - y
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= half ** 2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex at the top centre, base at the bottom
        depth = dy + half  # 0 at the apex, s at the base
        inside = (depth >= 0) & (depth <= s) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cov = inside.reshape(r1 - r0, k, c1 - c0, k).mean(axis=(1, 3))
    return slice(r0, r1), slice(c0, c1), cov


def draw(objects: Sequence[Obj], size: int = SIZE,
         background: Sequence[float] = BACKGROUND) -> np.ndarray:
    """Clean render of ``objects`` on a plain background: uint8 [size, size, 3]."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = np.asarray(background, dtype=np.float64)
    for o in objects:
        rs, cs, a = coverage(o.shape, o.x, o.y, o.s, size)
        col = np.asarray(COLORS[o.color], dtype=np.float64)
        img[rs, cs] = img[rs, cs] * (1 - a[..., None]) + col * a[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The look of a prompt without quality tags: blur, noise, or both (seeded).

    One of three kinds, equally likely: Gaussian blur (sigma in ``BLUR_SIGMA_PX32``),
    Gaussian noise (std in ``NOISE_STD``), or both at 70% strength.
    """
    size = image.shape[0]
    out = image.astype(np.float64)
    kind = int(rng.integers(3))  # 0 blur, 1 noise, 2 both
    scale = 0.7 if kind == 2 else 1.0
    if kind in (0, 2):
        sigma = rng.uniform(*BLUR_SIGMA_PX32) * scale * size / 32
        out = ndimage.gaussian_filter(out, sigma=(sigma, sigma, 0), mode="nearest")
    if kind in (1, 2):
        out = out + rng.normal(0.0, rng.uniform(*NOISE_STD) * scale, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE,
           return_objects: bool = False):
    """Place, draw and (for ``quality='degraded'``) degrade a scene: uint8 [size, size, 3]."""
    objects = place(scene, rng)
    img = draw(objects, size)
    if scene.quality == "degraded":
        img = degrade(img, rng)
    return (img, objects) if return_objects else img


# --------------------------------------------------------------------------- prompts
def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(template: str, scene: Scene, noun: str) -> str:
    return template.format(num=NUMBER_WORDS[scene.count], noun=noun, a_noun=_article(noun),
                           nouns=NOUNS[noun].plural)


def simple_prompt(scene: Scene, rng: np.random.Generator,
                  nouns: Sequence[str] = TRAIN_NOUNS, phrasing: str = "train") -> str:
    """A short narrative prompt for ``scene``: number word, everyday noun, verb phrase.

    The noun is ``scene.noun`` if set (it must be in ``nouns``), else a noun from ``nouns``
    of the scene's class. ``phrasing`` picks the template set ("train" or "heldout").
    For 3+ objects the arrangement is mentioned with probability 3/4, otherwise a plain
    counting phrase is used (the image still has its arrangement).
    """
    if scene.noun is not None:
        if scene.noun not in nouns:
            raise ValueError(f"noun {scene.noun!r} is not among the allowed nouns")
        noun = scene.noun
    else:
        fits = [n for n in nouns if (NOUNS[n].color, NOUNS[n].shape) == (scene.color, scene.shape)]
        if not fits:
            raise ValueError(f"no allowed noun is a {scene.color} {scene.shape}")
        noun = fits[int(rng.integers(len(fits)))]
    tpl = TEMPLATES[phrasing]
    if scene.count == 1:
        key = "single"
    elif scene.arrangement is None or rng.random() < 0.25:
        key = "count"
    else:
        key = scene.arrangement
    options = tpl[key]
    return _fill(options[int(rng.integers(len(options)))], scene, noun)


def _object_phrase(scene: Scene) -> str:
    return f"{scene.count} {scene.color} {scene.shape}" + ("s" if scene.count > 1 else "")


def _n_extra_tags(rng: np.random.Generator) -> int:
    """Long-tailed number of extra tags: most prompts get 0-3, a few get 20+."""
    return int(min(30, math.floor(rng.pareto(1.2) * 2.0)))


def complex_prompt(scene: Scene, rng: np.random.Generator) -> str:
    """Keyword-style, explicit prompt: "4 red circles, horizontal row, gray background, ...".

    Quality tags ("masterpiece, best quality, sharp focus" plus extra quality tags) appear
    iff ``scene.quality == "clean"``; neutral style tags may appear either way. The number
    of extra tags is long-tailed; the arrangement tag is left out with probability 1/4 and
    the background tag with probability 1/5; tag order varies (quality first sometimes,
    shuffled tails sometimes). The object phrase ("4 red circles") is always present.
    """
    head = [_object_phrase(scene)]
    if scene.arrangement is not None and rng.random() >= 0.25:
        opts = ARRANGEMENT_TAGS[scene.arrangement]
        head.append(opts[int(rng.integers(len(opts)))])
    if rng.random() >= 0.2:
        head.append(BACKGROUND_TAGS[int(rng.integers(len(BACKGROUND_TAGS)))])
    k = _n_extra_tags(rng)
    if scene.quality == "clean":
        quality = list(CORE_QUALITY_TAGS)
        pool = list(EXTRA_QUALITY_TAGS + STYLE_TAGS)
    else:
        quality, pool = [], list(STYLE_TAGS)
    extra = [pool[i] for i in rng.permutation(len(pool))[:k]]
    if rng.random() < 0.3:
        tags = quality + head + extra  # "masterpiece, best quality, 4 red circles, ..."
    else:
        tags = head + quality + extra
    if rng.random() < 0.3:  # keep the first tag, shuffle the rest
        rest = tags[1:]
        tags = tags[:1] + [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(tags)


def canonical_complex_prompt(scene: Scene) -> str:
    """The fixed complex counterpart used by the test prompts (always with quality tags)."""
    tags = [_object_phrase(scene)]
    if scene.arrangement is not None:
        tags.append(ARRANGEMENT_TAGS[scene.arrangement][0])
    return ", ".join(tags + [BACKGROUND_TAGS[0]] + list(CORE_QUALITY_TAGS))


# --------------------------------------------------------------------------- data
class PretrainBatch(NamedTuple):
    images: np.ndarray  # uint8 [n, size, size, 3]
    prompts: list[str]  # complex prompts
    scenes: list[Scene]


def sample_pretraining_batch(rng: np.random.Generator, n: int, size: int = SIZE,
                             p_clean: float = P_CLEAN) -> PretrainBatch:
    """Fresh (complex prompt, render) pairs for pretraining the base diffusion model.

    Scenes are drawn over all 7 x 3 classes (no nouns: the base model never sees simple
    prompts); a prompt has quality tags iff its render is clean. Empty prompts for
    classifier-free guidance are the training loop's business, not added here.
    """
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    prompts, scenes = [], []
    for i in range(n):
        scene = sample_scene(rng, nouns=None, p_clean=p_clean)
        images[i] = render(scene, rng, size)
        prompts.append(complex_prompt(scene, rng))
        scenes.append(scene)
    return PretrainBatch(images, prompts, scenes)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding with fixed options (no metadata), so equal images give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(
        buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_example(seed: int, index: int, size: int = SIZE, p_clean: float = P_CLEAN):
    """SURD-mini example ``index`` of dataset ``seed``: (image, metadata row).

    Each example has its own generator ``default_rng([seed, index])``, so an example does
    not depend on how many came before it.
    """
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, nouns=TRAIN_NOUNS, p_clean=p_clean)
    image = render(scene, rng, size)
    row = {
        "file_name": f"{index:05d}.png",
        "text": simple_prompt(scene, rng),
        "prompt": complex_prompt(scene, rng),
        **{k: v for k, v in asdict(scene).items()},
    }
    return image, row


def build_dataset(root, n: int, seed: int = 0, size: int = SIZE, p_clean: float = P_CLEAN,
                  progress: bool = True, force: bool = False) -> Path:
    """Write SURD-mini to ``root``: n PNGs + metadata.jsonl (authors' imagefolder layout).

    Rows: {"file_name", "text" (simple prompt), "prompt" (complex prompt), then the ground
    truth "count", "color", "shape", "arrangement", "noun", "quality"}. The same arguments
    give byte-identical files. Returns the metadata path.

    ``root`` must be empty or absent: a folder that holds anything (an earlier dataset, other
    images) is refused unless ``force``, which overwrites it (and removes the images of an
    earlier, larger build, so the folder is exactly the new dataset's files and metadata).
    The metadata is written last and atomically: a build stopped midway leaves no metadata.
    """
    from tqdm import tqdm

    from ..infra.cli import UsageError
    from ..infra.surd_files import write_metadata

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UsageError(f"n (the number of examples) must be a positive whole number, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 4096:
        raise UsageError(f"size (image side in pixels) must be a whole number from 8 to 4096, got {size!r}")
    from ..infra.config import check_seed

    check_seed("seed", int(seed) if isinstance(seed, np.integer) else seed)
    if not 0.0 <= float(p_clean) <= 1.0:
        raise UsageError(f"p_clean must be in [0, 1], got {p_clean!r}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        what = "a dataset (metadata.jsonl)" if (root / "metadata.jsonl").exists() else "files"
        raise UsageError(f"{root} already holds {what}: refusing to overwrite it "
                         "(pass --force, or force=True, to replace it)")
    root.mkdir(parents=True, exist_ok=True)
    if force:  # images of an earlier build beyond this one's n
        for p in root.glob("[0-9][0-9][0-9][0-9][0-9].png"):
            if int(p.stem) >= n:
                p.unlink()
    rows = []
    for i in tqdm(range(n), desc="SURD-mini", disable=not progress):
        image, row = make_example(seed, i, size, p_clean)
        (root / row["file_name"]).write_bytes(png_bytes(image))
        rows.append(row)
    return write_metadata(root, rows)


def dataset_digest(root) -> str:
    """SHA-256 over all file names and bytes under ``root`` (sorted): equal datasets, equal digest."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- test prompts
def _tp(type_, text, count, noun, arrangement=None, heldout=("noun",)):
    info = NOUNS[noun]
    scene = Scene(count, info.color, info.shape, arrangement, noun)
    return {"id": "", "type": type_, "text": text, "prompt": canonical_complex_prompt(scene),
            "count": count, "color": info.color, "shape": info.shape,
            "arrangement": arrangement, "noun": noun, "heldout": list(heldout)}


# The held-out evaluation prompts: 15 per type, as in the paper. Fixed data (a test checks
# their hash). "heldout" says what adapter training never saw: the noun, the phrasing, or
# both. Counting prompts leave the arrangement open (None): any layout is accepted.
# Action prompts use arrangements with 3-6 objects.
TEST_PROMPTS: tuple[dict, ...] = tuple([
    # counting: number word + held-out noun (train or held-out phrasing)
    _tp("counting", "two cherries on a table", 2, "cherry"),
    _tp("counting", "three plums on a plate", 3, "plum"),
    _tp("counting", "four tangerines", 4, "tangerine"),
    _tp("counting", "five olives on a plate", 5, "olive"),
    _tp("counting", "six pearls on a table", 6, "pearl"),
    _tp("counting", "a photo of three sugar cubes", 3, "sugar cube"),
    _tp("counting", "there are four basketballs", 4, "basketball"),
    _tp("counting", "a photo of five egg yolks", 5, "egg yolk"),
    _tp("counting", "two sticky notes on a table", 2, "sticky note"),
    _tp("counting", "three cheese wedges on a plate", 3, "cheese wedge"),
    _tp("counting", "exactly four christmas trees", 4, "christmas tree", heldout=("noun", "phrasing")),
    _tp("counting", "a group of six cherries", 6, "cherry", heldout=("noun", "phrasing")),
    _tp("counting", "exactly five lemons", 5, "lemon", heldout=("phrasing",)),
    _tp("counting", "a group of four dice", 4, "die", heldout=("phrasing",)),
    _tp("counting", "six limes waiting on the kitchen counter", 6, "lime", heldout=("phrasing",)),
    # colour: what the held-out noun looks like (few objects, so they are large)
    _tp("color", "a cherry on a table", 1, "cherry"),
    _tp("color", "a single tangerine", 1, "tangerine"),
    _tp("color", "a basketball on a table", 1, "basketball"),
    _tp("color", "an egg yolk on a plate", 1, "egg yolk"),
    _tp("color", "a sticky note", 1, "sticky note"),
    _tp("color", "a photo of a cheese wedge", 1, "cheese wedge"),
    _tp("color", "an olive on a plate", 1, "olive"),
    _tp("color", "a single christmas tree", 1, "christmas tree"),
    _tp("color", "a plum on a table", 1, "plum"),
    _tp("color", "a photo of a pearl", 1, "pearl"),
    _tp("color", "a sugar cube on a table", 1, "sugar cube"),
    _tp("color", "two plums on a plate", 2, "plum"),
    _tp("color", "two tangerines on a table", 2, "tangerine"),
    _tp("color", "just one olive by itself", 1, "olive", heldout=("noun", "phrasing")),
    _tp("color", "just one sticky note by itself", 1, "sticky note", heldout=("noun", "phrasing")),
    # action (arrangement): held-out phrasings and/or held-out nouns
    _tp("action", "four tomatoes standing in a straight line", 4, "tomato", "row", ("phrasing",)),
    _tp("action", "five limes queued up one after another", 5, "lime", "row", ("phrasing",)),
    _tp("action", "three cherries in a row", 3, "cherry", "row"),
    _tp("action", "a tower of four dice", 4, "die", "stack", ("phrasing",)),
    _tp("action", "three lemons balanced one above the other", 3, "lemon", "stack", ("phrasing",)),
    _tp("action", "a stack of five sugar cubes", 5, "sugar cube", "stack"),
    _tp("action", "six blueberries forming a loop", 6, "blueberry", "ring", ("phrasing",)),
    _tp("action", "four oranges arranged like a wreath", 4, "orange", "ring", ("phrasing",)),
    _tp("action", "five plums in a circle", 5, "plum", "ring"),
    _tp("action", "four grapes strewn all over the place", 4, "grape", "scattered", ("phrasing",)),
    _tp("action", "five golf balls tossed about at random", 5, "golf ball", "scattered", ("phrasing",)),
    _tp("action", "three olives scattered around", 3, "olive", "scattered"),
    _tp("action", "a tower of three sticky notes", 3, "sticky note", "stack", ("noun", "phrasing")),
    _tp("action", "six pearls standing in a straight line", 6, "pearl", "row", ("noun", "phrasing")),
    _tp("action", "four tangerines forming a loop", 4, "tangerine", "ring", ("noun", "phrasing")),
])
TEST_TYPES = ("counting", "color", "action")
_seen: dict[str, int] = {}
for _p in TEST_PROMPTS:  # ids: counting-00 .. counting-14, color-00 .., action-00 ..
    _p["id"] = f"{_p['type']}-{_seen.setdefault(_p['type'], 0):02d}"
    _seen[_p["type"]] += 1
del _p, _seen


def test_prompts(type_: str | None = None) -> list[dict]:
    """The fixed held-out test prompts (copies), optionally of one type."""
    if type_ is not None and type_ not in TEST_TYPES:
        raise ValueError(f"type must be one of {TEST_TYPES}, got {type_!r}")
    return [dict(p, heldout=list(p["heldout"])) for p in TEST_PROMPTS
            if type_ is None or p["type"] == type_]


test_prompts.__test__ = False  # not a pytest test


def test_prompts_digest() -> str:
    """SHA-256 of the test prompts as canonical JSON (a test pins it)."""
    return hashlib.sha256(json.dumps(list(TEST_PROMPTS), sort_keys=True).encode()).hexdigest()


test_prompts_digest.__test__ = False


def scene_of(spec: dict, quality: str = "clean") -> Scene:
    """The Scene a test prompt (or metadata row) describes."""
    return Scene(spec["count"], spec["color"], spec["shape"], spec.get("arrangement"),
                 spec.get("noun"), quality)


def template_regex(template: str) -> re.Pattern:
    """A regex matching every prompt a template can produce (placeholders -> '.+')."""
    parts = re.split(r"\{[a-z_]+\}", template)
    return re.compile(".+".join(re.escape(p) for p in parts) + r"\Z")


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sur_lib.world.toyworld", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write SURD-mini (PNG images + metadata.jsonl) to DIR")
    b.add_argument("dir")
    b.add_argument("--n", type=int, required=True, help="number of examples")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", type=int, default=SIZE, help="image side in pixels")
    b.add_argument("--p-clean", type=float, default=P_CLEAN,
                   help="share of examples with quality tags and clean renders")
    b.add_argument("--force", action="store_true",
                   help="overwrite DIR if it already holds a dataset or other files")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        path = build_dataset(args.dir, args.n, args.seed, args.size, args.p_clean, force=args.force)
        print(f"wrote {args.n} examples to {path.parent} (digest {dataset_digest(path.parent)[:16]})")
    return 0


if __name__ == "__main__":
    from sur_lib.infra.cli import run

    run(main)
