"""Evaluation: the SUR world's judge and image quality scores.

The judge
---------
``judge(image)`` reads a picture of the SUR world (``sur_lib.world.toyworld``) by rule, no
learning involved:

1. **Background**: the median colour of the image's border pixels.
2. **Coverage**: each pixel's offset from the background is projected onto the direction
   (palette colour - background) of the palette colour it points to most closely; the
   projection is the share of the pixel an object of that colour would cover (anti-aliased
   edges give fractions). A pixel is **foreground** when more than half covered
   (coverage >= ``FG_COVERAGE`` = 0.6). A coverage rule, rather than a fixed distance such
   as 40/255, keeps apart two objects separated by a gap of 1.25 px (rows of six): at most
   one pixel across such a gap is more than half covered. (0.6, not 0.5: the renderer's
   4x supersampling measures coverage in quarters, so both sides can read 0.5.)
3. **Objects**: 4-connected components of the foreground with a total coverage of at least
   ``MIN_AREA_PX32`` pixels (at 32 x 32); smaller ones are noise.
4. **Colour** of an object: the palette colour closest in direction to the mean offset of
   its pixels.
5. **Shape**: the object's coverage (its pixels and those within ``REGION_RADIUS_PX32``,
   each given to the nearest object) is compared with a clean circle, square and triangle
   of the same area and centroid, each also blurred with a few sigmas
   (``BLUR_GRID_PX32``); the shape with the smallest squared error wins (``fit_shape``).
   Fitting blurred models is what keeps the judge right on blurred renders, where a
   triangle's fill and skewness look like a circle's.
6. **Arrangement**: ``toyworld.arrangement_of`` on the objects' centroids (the world's own
   definition: row, stack, ring or scattered; None below 3 objects).

``score(image, spec)`` turns a judgement into booleans. **Semantic correctness**, the
number the experiments report, is defined per prompt type:

* counting: ``count_ok and color_ok`` -- exactly the asked number of objects, all of the
  noun's colour (shape is not required: in rows of six, objects are only ~4 px wide);
* color: ``object_ok`` = ``color_ok and shape_ok`` -- the objects look like the noun: all
  of its colour, and the most common shape is its shape;
* action: ``arrangement_ok and color_ok`` -- the asked arrangement, made of objects of the
  noun's colour (the count is not required).

How often the judge is right is measured on fresh ground-truth renders by
``sur_lib.study.judge_accuracy``. ``ATTRIBUTES`` names what it reads.

Quality: ``brisque_scores`` (the PyPI ``brisque`` package) and ``clean_render_distance``.
The statistics of the numbers (intervals, paired tests, summaries) are in ``sur_lib.study.statistics``.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from sur_lib.world import toyworld as tw

FG_COVERAGE = 0.6  # a pixel is foreground when more than half covered
MIN_AREA_PX32 = 3.0  # an object covers at least this many pixels (at 32 x 32)
REGION_RADIUS_PX32 = 2.0  # an object's region: its pixels and those within 2 px

_PALETTE_NAMES = list(tw.COLORS)
_PALETTE = np.array([tw.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)


def _as_uint8_rgb(image) -> np.ndarray:
    """Accept uint8 [H, W, 3], float [H, W, 3] in [0, 1], or a PIL image."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] < 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return a


def _background(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def _coverage_maps(img: np.ndarray, bg: np.ndarray):
    """Per pixel: index of the nearest palette direction and the coverage along it."""
    v = img.astype(np.float64) - bg  # [H, W, 3]
    d = _PALETTE - bg  # [K, 3]
    norm = np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1.0)  # bg may be a palette colour
    dn = d / norm
    cos = (v @ dn.T) / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-9)  # [H, W, K]
    best = np.argmax(cos, axis=-1)
    proj = (v @ d.T) / (norm[:, 0] ** 2)  # coverage along each colour, [H, W, K]
    cov = np.take_along_axis(proj, best[..., None], axis=-1)[..., 0]
    return v, d, best, cov, proj


_AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2
BLUR_GRID_PX32 = (0.0, 0.3, 0.5, 0.7, 0.9, 1.1)  # blurs tried when fitting shapes


def _model_patch(shape: str, x: float, y: float, s: float, size: int,
                 r0: int, r1: int, c0: int, c1: int, sigmas: Sequence[float]) -> list[np.ndarray]:
    """Coverage of one clean shape (pixel units) on rows r0:r1, cols c0:c1, for each blur."""
    pad = int(math.ceil(3 * max(sigmas))) + 1
    canvas = np.zeros((r1 - r0 + 2 * pad, c1 - c0 + 2 * pad))
    rs, cs, a = tw.coverage(shape, x / size, y / size, s / size, size)
    # paste the shape's coverage into the padded window (clipped to it)
    R0, C0 = r0 - pad, c0 - pad
    ys0, ys1 = max(rs.start, R0), min(rs.stop, R0 + canvas.shape[0])
    xs0, xs1 = max(cs.start, C0), min(cs.stop, C0 + canvas.shape[1])
    if ys1 > ys0 and xs1 > xs0:
        canvas[ys0 - R0:ys1 - R0, xs0 - C0:xs1 - C0] = a[ys0 - rs.start:ys1 - rs.start,
                                                         xs0 - cs.start:xs1 - cs.start]
    out = []
    for sig in sigmas:
        b = ndimage.gaussian_filter(canvas, sig, mode="constant") if sig > 0 else canvas
        out.append(b[pad:-pad, pad:-pad])
    return out


def fit_shape(alpha: np.ndarray, region: np.ndarray) -> dict:
    """Which clean shape, possibly blurred, best explains an object's coverage.

    ``alpha`` is the coverage map (image size, unclipped, so noise stays zero-mean) and
    ``region`` the object's pixels. For each shape the side follows from the area
    (area = side^2 x {circle: pi/4, square: 1, triangle: 1/2}) and the position from the
    centroid (a triangle's centroid lies side/6 below its box centre); the shape is drawn
    with ``toyworld.coverage``, blurred with each sigma of ``BLUR_GRID_PX32``, and compared
    with the coverage by the sum of squared differences over the region. The shape (and
    blur) with the smallest error wins. Returns centroid ``cx``, ``cy`` (pixels), ``area``,
    ``shape``, side ``s`` (pixels), ``blur`` (pixels) and ``sse`` per shape.
    """
    size = alpha.shape[1]
    ys, xs = np.nonzero(region)
    r0, r1, c0, c1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    a = np.where(region[r0:r1, c0:c1], alpha[r0:r1, c0:c1], 0.0)
    area = float(a.sum())
    w = np.clip(a, 0.0, 1.0)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    wsum = max(float(w.sum()), 1e-9)
    cx = float((w * (xx + 0.5)).sum() / wsum)  # pixel centres at +0.5
    cy = float((w * (yy + 0.5)).sum() / wsum)
    sigmas = [g * size / 32 for g in BLUR_GRID_PX32]
    mask = region[r0:r1, c0:c1]
    best, sse, fits = None, {}, {}
    for shape, k in _AREA_FACTOR.items():
        s = math.sqrt(max(area, 1e-9) / k)
        y = cy - (s / 6 if shape == "triangle" else 0.0)
        errs = [float((((m - a) * mask) ** 2).sum())
                for m in _model_patch(shape, cx, y, s, size, r0, r1, c0, c1, sigmas)]
        i = int(np.argmin(errs))
        sse[shape] = errs[i]
        fits[shape] = (s, sigmas[i])
        if best is None or errs[i] < sse[best]:
            best = shape
    return {"cx": cx, "cy": cy, "area": area, "shape": best, "s": fits[best][0],
            "blur": fits[best][1], "sse": sse}


def judge(image) -> dict:
    """Read a SUR-world image: objects, count, colour, shape, arrangement.

    Returns a dict with ``count`` (objects found), ``color`` and ``shape`` (the most common
    among the objects; None if there are none or if two tie), ``arrangement``
    (``toyworld.arrangement_of`` on the centroids; None below 3 objects), ``background``
    (RGB) and ``objects``: one dict per object with centroid ``x``, ``y`` and side ``s``
    (canvas fractions), ``area`` (pixels), ``color``, ``shape``, ``blur`` (the best-fitting
    blur sigma, pixels) and ``sse`` (fit error per shape).
    """
    img = _as_uint8_rgb(image)
    H, W = img.shape[:2]
    if H != W:
        raise ValueError(f"the SUR world's images are square, got {H} x {W}")
    bg = _background(img)
    v, d, best, cov, proj = _coverage_maps(img, bg)
    fg = cov >= FG_COVERAGE
    labels, n = ndimage.label(fg)  # 4-connectivity
    min_area = MIN_AREA_PX32 * (H * W) / (32 * 32)
    if n:  # every pixel goes to its nearest component (edge pixels below the threshold)
        dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        owner = labels[iy, ix]
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1.0)
    objects = []
    for k in range(1, n + 1):
        comp = labels == k
        mean_v = v[comp].mean(axis=0)
        ci = int(np.argmax(dn @ mean_v / (np.linalg.norm(mean_v) + 1e-9)))
        region = (owner == k) & (dist <= REGION_RADIUS_PX32 * W / 32)
        f = fit_shape(proj[..., ci], region)
        if f["area"] < min_area:
            continue
        objects.append({"x": f["cx"] / W, "y": f["cy"] / H, "s": f["s"] / W,
                        "area": f["area"], "color": _PALETTE_NAMES[ci], "shape": f["shape"],
                        "blur": f["blur"], "sse": f["sse"]})
    objects.sort(key=lambda o: (o["y"], o["x"]))

    def majority(key):
        c = Counter(o[key] for o in objects).most_common(2)
        if not c or (len(c) > 1 and c[0][1] == c[1][1]):
            return None
        return c[0][0]

    points = [(o["x"], o["y"]) for o in objects]
    return {"count": len(objects), "color": majority("color"), "shape": majority("shape"),
            "arrangement": tw.arrangement_of(points) if points else None,
            "background": [float(x) for x in bg], "objects": objects}


def score(image, spec: Mapping, judgement: Mapping | None = None) -> dict:
    """Booleans for one image against a prompt's ground truth ``spec``.

    ``spec`` has ``count``, ``color``, ``shape``, optionally ``arrangement`` and ``type``
    ("counting", "color" or "action": a test prompt or a metadata row).

    * ``count_ok``: the number of objects found equals ``spec["count"]``;
    * ``color_ok``: at least one object, and every object has the spec's colour;
    * ``shape_ok``: at least one object, and the most common shape is the spec's shape;
    * ``object_ok``: ``color_ok and shape_ok``;
    * ``arrangement_ok``: the judged arrangement equals the spec's (None when the spec has
      no arrangement: not scored);
    * ``correct`` (semantic correctness, per type): counting -> ``count_ok and color_ok``;
      color -> ``object_ok``; action -> ``arrangement_ok and color_ok``. Without a type,
      all scored attributes must hold.
    """
    j = judge(image) if judgement is None else judgement
    objs = j["objects"]
    count_ok = j["count"] == spec["count"]
    color_ok = bool(objs) and all(o["color"] == spec["color"] for o in objs)
    shape_ok = bool(objs) and j["shape"] == spec["shape"]
    object_ok = color_ok and shape_ok
    arr = spec.get("arrangement")
    arrangement_ok = None if arr is None else j["arrangement"] == arr
    t = spec.get("type")
    if t == "counting":
        correct = count_ok and color_ok
    elif t == "color":
        correct = object_ok
    elif t == "action":
        correct = bool(arrangement_ok) and color_ok
    elif t is None:
        correct = count_ok and object_ok and arrangement_ok is not False
    else:
        raise ValueError(f"unknown prompt type {t!r}")
    return {"count_ok": count_ok, "color_ok": color_ok, "shape_ok": shape_ok,
            "object_ok": object_ok, "arrangement_ok": arrangement_ok, "correct": bool(correct)}


# what the judge's accuracy is reported for (sur_lib.study.judge_accuracy)
ATTRIBUTES = ("count", "color", "shape", "object", "arrangement", "scene")


# --------------------------------------------------------------------------- quality
def brisque_scores(images) -> np.ndarray:
    """BRISQUE (lower = better) of each image, with the PyPI ``brisque`` package offline.

    ``brisque`` 0.2 needs ``opencv-python-headless``, ``scikit-image`` and
    ``libsvm-official`` (its SVM model ships inside the package; nothing is downloaded).
    Its own ``BRISQUE.score`` fails with numpy >= 2 (it calls ``float()`` on 1-element
    arrays), so this function runs the same steps through the package's own methods and
    only turns those features into plain floats. Caveat for the book: BRISQUE was fitted
    to natural photographs (LIVE); 32 x 32 flat synthetic images are far outside that
    domain and its scores there are erratic, which is why ``clean_render_distance`` exists.
    """
    try:
        import cv2
        import skimage.color
        from brisque import BRISQUE
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("brisque_scores needs: pip install brisque opencv-python-headless "
                          "scikit-image libsvm-official") from e
    model = _brisque_model(BRISQUE)
    out = []
    for im in images:
        gray = skimage.color.rgb2gray(_as_uint8_rgb(im))
        f1 = model.calculate_brisque_features(gray, kernel_size=7, sigma=7 / 6)
        half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
        f2 = model.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6)
        feats = [float(np.ravel(np.asarray(x, dtype=np.float64))[0])
                 for x in np.concatenate([f1, f2])]
        out.append(float(model.calculate_image_quality_score(feats)))
    return np.array(out)


_BRISQUE = None


def _brisque_model(cls):
    global _BRISQUE
    if _BRISQUE is None:
        _BRISQUE = cls(url=False)
    return _BRISQUE


def clean_render_distance(images) -> np.ndarray:
    """RMS distance (0-255 units, lower = better) from each image to the clean render of
    what the judge sees in it.

    Why this measure: every clean image of the SUR world is flat palette colours on the
    gray background with anti-aliased edges. The judge recovers each object's colour,
    shape, position and size; re-drawing those objects cleanly (``toyworld.draw``) gives
    the picture the image "should" be. Noise, blur, off-palette colours, a tinted
    background or malformed shapes all add distance, and a perfect render scores ~0
    (clean world renders: 0.2 on average, at most ~1.5, from sub-pixel fitting error;
    degraded ones: ~4 for blur, ~7-11 for noise). Unlike the variance of the
    Laplacian it does not reward noise as "sharpness", and unlike BRISQUE it was made for
    exactly these images. It measures style fidelity, not semantics: a wrong but clean
    image scores well, which is what a quality measure should do.
    """
    out = []
    for im in images:
        img = _as_uint8_rgb(im)
        size = img.shape[0]
        j = judge(img)
        objs = []
        for o in j["objects"]:
            y = o["y"] - (o["s"] / 6 if o["shape"] == "triangle" else 0.0)  # centroid -> box
            objs.append(tw.Obj(o["x"], y, o["s"], o["color"], o["shape"]))
        ref = tw.draw(objs, size)
        out.append(float(np.sqrt(np.mean((img.astype(np.float64) - ref) ** 2))))
    return np.array(out)
