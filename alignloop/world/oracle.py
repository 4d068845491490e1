"""The oracle judge: checks an image against its prompt, aspect by aspect, as a person would.

It reads generated images, whose edges are soft and whose colors drift, the way it reads crisp renders:

1. Background: the most common background color of the palette (each pixel snapped to its nearest palette
   color); its actual color is the median of those pixels, so a drifted or noisy background still works.
2. Foreground: every pixel is read as a mix of the background B and one other color c, p ~ B + a*(c - B):
   c is the palette color (objects' or another background's) whose line from B passes nearest to the
   pixel, and the pixel is foreground when a >= 1/2. That is the half-way cut through a blurred edge: it puts a soft edge where the crisp one was,
   and colors the edge pixels by the object they belong to instead of by whichever palette entry they
   happen to fall near (a red-on-gray edge pixel is not "brown").
3. Objects: 4-connected components of the foreground (smaller than MIN_AREA: noise), each colored by its
   pixels' majority. A prompt that names a color counts the components of that color; one that leaves it
   open counts every component.
4. Each object is read against templates of the renderer's shapes, fitted at its centroid over a range of
   sizes and sub-pixel offsets (best intersection over union). Then:
   - a *clump*, objects drawn touching or overlapping: as long as two of the smallest objects side by side,
     or pinched at a neck (one erosion splits it), or elongated beyond what one object can be. A clump fails
     the count (the world draws objects apart) and is not judged for shape, so that one layout mistake is
     charged to the count alone, as a person would charge it;
   - *malformed*: no template fits (a blob), or stretched (an egg, a 20x13 "square"): its shape fails;
   - otherwise its shape is the best-fitting template's.
5. Verdicts: count (no clump, and as many objects as named), shape (every judged object well formed and of
   the named shape), color (objects of the named color hold at least COLOR_PURITY of the foreground),
   background; the overall pass needs all that the prompt names.
"""

import dataclasses
import functools
from typing import Optional

import numpy as np
from scipy import ndimage

from alignloop.world.grammar import SHAPES, parse_prompt
from alignloop.world.render import BACKGROUND_RGB, MIN_SIZE, OBJECT_RGB

MIN_AREA = 8  # pixels; smaller foreground specks are noise
CLUMP_SIDE = 2 * MIN_SIZE  # a component this long is two of the smallest objects side by side
CLUMP_STRETCH = 1.55  # elongation (principal axes, relative to the fitted shape) beyond any one object
MAX_STRETCH = 1.3  # elongation above which one object is distorted (an egg, a rectangle), not its shape
MIN_FIT = 0.72  # intersection over union with the best template; below it the object is a blob
NECK_PART = 3  # pixels each part must keep after one erosion to count as a neck split
COLOR_PURITY = 0.6  # share of foreground pixels that must belong to objects of the named color

_PALETTE_NAMES = list(OBJECT_RGB) + list(BACKGROUND_RGB)
_PALETTE = np.array(list(OBJECT_RGB.values()) + list(BACKGROUND_RGB.values()), np.float32)
_N_OBJECT_COLORS = len(OBJECT_RGB)
_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass
class Verdict:
    """Per-aspect verdicts; None where the prompt does not name the aspect."""

    count: bool
    shape: bool
    color: Optional[bool]
    background: Optional[bool]
    found_count: int  # objects of the judged color; a clump counts as the objects it seems to hold
    found_color: Optional[str]
    found_background: str

    @property
    def passed(self) -> bool:
        return all(v is not False for v in (self.count, self.shape, self.color, self.background))

    def aspects(self) -> dict:
        return {k: v for k, v in (("count", self.count), ("color", self.color), ("shape", self.shape),
                                  ("background", self.background)) if v is not None}


@dataclasses.dataclass(frozen=True)
class ObjectReading:
    """How one foreground component reads."""

    shape: str  # the best-fitting template's shape
    fit: float  # its intersection over union with the component
    stretch: float  # elongation relative to that template: 1.0 for a true square, circle or triangle
    clump: bool  # looks like objects drawn touching or overlapping
    objects: int  # how many objects it seems to hold (1 unless a clump)

    @property
    def well_formed(self) -> bool:
        return not self.clump and self.fit >= MIN_FIT and self.stretch < MAX_STRETCH


# ---------------------------------------------------------------------------------------------------------
# Pixels


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index into the palette of each pixel's nearest color; pixels [N, 3] float32."""
    return ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1)


def _read_pixels(image: np.ndarray):
    """(background name, foreground mask [H, W], palette index of each pixel's color [H, W], mix amount [H, W])."""
    h, w, _ = image.shape
    pixels = image.reshape(-1, 3).astype(np.float32)
    labels = _nearest_palette(pixels)

    # 1. Background: the most common background label; its color, the median of its pixels.
    background_counts = np.bincount(labels, minlength=len(_PALETTE))[_N_OBJECT_COLORS:]
    background = int(background_counts.argmax())
    members = pixels[labels == _N_OBJECT_COLORS + background]
    b = np.median(members, 0) if len(members) else _PALETTE[_N_OBJECT_COLORS + background]

    # 2. Each pixel as b + a * (c - b) for the color c whose segment from b passes nearest: any palette color
    #    but the background's own, since an object can be drawn in another background's color (brown on white).
    candidates = [i for i in range(len(_PALETTE)) if i != _N_OBJECT_COLORS + background]
    directions = _PALETTE[candidates] - b  # [C, 3]
    amounts = (pixels - b) @ directions.T / (directions ** 2).sum(1)  # [N, C]
    on_segment = np.clip(amounts, 0.0, 1.0)
    residuals = ((pixels[:, None, :] - (b + on_segment[..., None] * directions)) ** 2).sum(-1)  # [N, C]
    nearest = residuals.argmin(1)
    amount = amounts[np.arange(len(pixels)), nearest]
    color = np.asarray(candidates)[nearest]  # index into the palette
    foreground = amount >= 0.5  # the half-way cut
    return (_PALETTE_NAMES[_N_OBJECT_COLORS + background], foreground.reshape(h, w), color.reshape(h, w),
            amount.reshape(h, w))


# ---------------------------------------------------------------------------------------------------------
# Shapes


def _template_masks(shape: str, sizes: np.ndarray, cy: np.ndarray, cx: np.ndarray, h: int, w: int) -> np.ndarray:
    """Masks [K, h, w] of the renderer's shape of side sizes[k] with its centroid at (cy[k], cx[k]), sampled at
    pixel centres as the renderer samples them."""
    yy = np.arange(h, dtype=np.float32)[None, :, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, None, :] + 0.5
    s, cy, cx = sizes[:, None, None], cy[:, None, None], cx[:, None, None]
    if shape == "square":
        return (np.abs(yy - cy) <= s / 2) & (np.abs(xx - cx) <= s / 2)
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= (s / 2) ** 2
    if shape == "triangle":  # apex up; the centroid is two thirds of the way down
        u = yy - (cy - 2 * s / 3)
        return (u >= 0) & (u <= s) & (np.abs(xx - cx) <= u / 2)
    raise ValueError(f"unknown shape {shape!r}")


# Side of each shape from its area, and the covariance of its area (in units of side^2): what the fit and
# the elongation are measured against.
_SIDE_FROM_AREA = {"square": 1.0, "circle": float(np.sqrt(4 / np.pi)), "triangle": float(np.sqrt(2.0))}
_SHAPE_COVARIANCE = {"square": np.diag([1 / 12, 1 / 12]), "circle": np.diag([1 / 16, 1 / 16]),
                     "triangle": np.diag([1 / 18, 1 / 24])}  # (y, x)
_SIZE_STEPS = np.arange(-1.5, 1.51, 0.5)
_OFFSETS = np.array([-0.5, 0.0, 0.5])


@functools.lru_cache(maxsize=None)
def _fit_grid():
    """Every (size step, y offset, x offset) tried, as three flat arrays."""
    grid = np.stack(np.meshgrid(_SIZE_STEPS, _OFFSETS, _OFFSETS, indexing="ij"), -1).reshape(-1, 3)
    return grid[:, 0], grid[:, 1], grid[:, 2]


def _elongation(covariance: np.ndarray, reference: np.ndarray) -> float:
    """sqrt of the ratio of principal variances of `covariance` after whitening by `reference` (1: same
    proportions as the reference shape)."""
    values, vectors = np.linalg.eigh(reference)
    whiten = vectors @ np.diag(values ** -0.5) @ vectors.T
    ratios = np.linalg.eigvalsh(whiten @ covariance @ whiten)
    return float(np.sqrt(ratios[-1] / max(ratios[0], 1e-6)))


def read_object(component: np.ndarray) -> ObjectReading:
    """Read one boolean component mask (any crop that contains it)."""
    ys, xs = np.nonzero(component)
    area = len(ys)
    # 1. Crop with a margin wide enough for any template tried.
    pad = 3
    y0, x0 = ys.min() - pad, xs.min() - pad
    h, w = ys.max() - y0 + pad + 1, xs.max() - x0 + pad + 1
    mask = np.zeros((h, w), bool)
    mask[ys - y0, xs - x0] = True
    cy, cx = ys.mean() - y0 + 0.5, xs.mean() - x0 + 0.5
    coords = np.stack([ys, xs], 1).astype(np.float64)
    covariance = np.cov(coords.T, bias=True) + np.eye(2) / 12  # + the variance of a pixel's own area

    # 2. The best template of each shape, fitted at the centroid.
    size_steps, dy, dx = _fit_grid()
    best = {}
    for shape in SHAPES:
        sizes = (np.sqrt(area) * _SIDE_FROM_AREA[shape] + size_steps).astype(np.float32)
        templates = _template_masks(shape, sizes, (cy + dy).astype(np.float32), (cx + dx).astype(np.float32), h, w)
        inter = (templates & mask).sum((1, 2))
        union = (templates | mask).sum((1, 2))
        k = int(np.argmax(inter / union))
        best[shape] = (float(inter[k] / union[k]), float(sizes[k]))
    shape = max(SHAPES, key=lambda s: best[s][0])
    fit, side = best[shape]
    stretch = _elongation(covariance, _SHAPE_COVARIANCE[shape] * side ** 2)

    # 3. Objects drawn touching or overlapping: too long, pinched, or too elongated for one object.
    length = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    eroded, parts = ndimage.label(ndimage.binary_erosion(mask, _CROSS))
    necked = parts >= 2 and np.sort(np.bincount(eroded.ravel())[1:])[-2] >= NECK_PART
    clump = bool(length >= CLUMP_SIDE or necked or stretch >= CLUMP_STRETCH)
    extent = sorted((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    objects = max(2, round(extent[1] / extent[0])) if clump else 1
    return ObjectReading(shape=shape, fit=round(fit, 4), stretch=round(stretch, 4), clump=clump, objects=objects)


# ---------------------------------------------------------------------------------------------------------
# The judge


def read_scene(image: np.ndarray):
    """(background name, foreground pixel count, objects): each object a (color name, boolean mask [H, W]) for a
    foreground component of at least MIN_AREA pixels, colored by its pixels' majority (weighted by how solid each
    pixel is). `image` is a uint8 [H, W, 3] array."""
    background, foreground, color, amount = _read_pixels(image)
    labeled, n = ndimage.label(foreground, _CROSS)
    objects = []
    for i in range(1, n + 1):
        member = labeled == i
        if member.sum() >= MIN_AREA:
            votes = np.bincount(color[member], weights=np.clip(amount[member], 0, 1), minlength=len(_PALETTE))
            objects.append((_PALETTE_NAMES[int(votes.argmax())], member))
    return background, int(foreground.sum()), objects


def judge(image, prompt) -> Verdict:
    """Judge one image (uint8 HxWx3 array or PIL image) against a Prompt or a prompt text."""
    # 1. Check inputs
    if isinstance(prompt, str):
        parsed = parse_prompt(prompt)
        if parsed is None:
            raise ValueError(f"not a prompt of the shapes world: {prompt!r}")
        prompt = parsed
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")

    # 2. Background, foreground and objects; only the objects the prompt is about are read for shape
    found_background, foreground_pixels, objects = read_scene(image)
    pixels_by_color = {}
    for name, mask in objects:
        pixels_by_color[name] = pixels_by_color.get(name, 0) + int(mask.sum())
    dominant = max(pixels_by_color, key=pixels_by_color.get) if pixels_by_color else None
    judged = [read_object(mask) for name, mask in objects if prompt.color is None or name == prompt.color]

    # 4. Verdicts
    color_ok = None
    if prompt.color is not None:
        named = pixels_by_color.get(prompt.color, 0)
        color_ok = bool(judged) and named >= COLOR_PURITY * max(foreground_pixels, 1)
    singles = [r for r in judged if not r.clump]
    return Verdict(
        count=not any(r.clump for r in judged) and len(judged) == prompt.count,
        shape=bool(singles) and all(r.well_formed and r.shape == prompt.shape for r in singles),
        color=color_ok,
        background=None if prompt.background is None else found_background == prompt.background,
        found_count=sum(r.objects for r in judged),
        found_color=dominant,
        found_background=found_background,
    )
