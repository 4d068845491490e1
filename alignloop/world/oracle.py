"""The oracle judge: checks an image against its prompt, aspect by aspect.

Each pixel is snapped to the nearest palette color; the background is the most common background color;
objects are the connected components of the named object color (or, when the prompt leaves the color
open, of the most common object color). Components smaller than MIN_AREA are noise. Shapes are told
apart by how much of their bounding box they fill (square ~1, circle ~0.8, triangle ~0.5). A component as
long as two of the smallest objects side by side is a clump of objects drawn touching: it counts as one
object, so the count fails, but the shape verdict is taken on the separate objects, so that one layout
mistake is charged to the count alone, as a person would charge it.
"""

import dataclasses
from typing import Optional

import numpy as np
from scipy import ndimage

from alignloop.world.grammar import parse_prompt
from alignloop.world.render import BACKGROUND_RGB, MIN_SIZE, OBJECT_RGB

MIN_AREA = 8
CLUMP_SIDE = 2 * MIN_SIZE
COLOR_PURITY = 0.6  # share of object pixels that must be the named color
_PALETTE_NAMES = list(OBJECT_RGB) + list(BACKGROUND_RGB)
_PALETTE = np.array(list(OBJECT_RGB.values()) + list(BACKGROUND_RGB.values()), np.float32)
_N_OBJECT_COLORS = len(OBJECT_RGB)


@dataclasses.dataclass
class Verdict:
    """Per-aspect verdicts; None where the prompt does not name the aspect."""

    count: bool
    shape: bool
    color: Optional[bool]
    background: Optional[bool]
    found_count: int
    found_color: Optional[str]
    found_background: str

    @property
    def passed(self) -> bool:
        return all(v is not False for v in (self.count, self.shape, self.color, self.background))

    def aspects(self) -> dict:
        return {k: v for k, v in (("count", self.count), ("color", self.color), ("shape", self.shape),
                                  ("background", self.background)) if v is not None}


def is_clump(component: np.ndarray) -> bool:
    ys, xs = np.nonzero(component)
    return max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 >= CLUMP_SIDE


def classify_shape(component: np.ndarray) -> str:
    """The shape of one boolean component mask, cropped or not."""
    ys, xs = np.nonzero(component)
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if fill >= 0.88:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"


def _labels(image: np.ndarray) -> np.ndarray:
    """Index into the palette of each pixel's nearest color, (H, W)."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    distances = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1)
    return distances.argmin(1).reshape(image.shape[:2])


def judge(image, prompt) -> Verdict:
    """Judge one image (uint8 HxWx3 array or PIL image) against a Prompt or a prompt text."""
    if isinstance(prompt, str):
        parsed = parse_prompt(prompt)
        if parsed is None:
            raise ValueError(f"not a prompt of the shapes world: {prompt!r}")
        prompt = parsed
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    labels = _labels(image)

    # 1. Background: the most common background color.
    background_counts = np.bincount(labels.ravel(), minlength=len(_PALETTE))[_N_OBJECT_COLORS:]
    found_background = _PALETTE_NAMES[_N_OBJECT_COLORS + int(background_counts.argmax())]

    # 2. Object color: the named one, or the most common object color.
    object_counts = np.bincount(labels.ravel(), minlength=len(_PALETTE))[:_N_OBJECT_COLORS]
    dominant = _PALETTE_NAMES[int(object_counts.argmax())] if object_counts.sum() else None
    target = prompt.color or dominant
    components = []
    if target is not None:
        mask = labels == _PALETTE_NAMES.index(target)
        labeled, n = ndimage.label(mask)
        sizes = np.bincount(labeled.ravel(), minlength=n + 1)
        components = [labeled == i for i in range(1, n + 1) if sizes[i] >= MIN_AREA]
    target_pixels = sum(int(c.sum()) for c in components)

    # 3. Verdicts.
    color_ok = None
    if prompt.color is not None:
        color_ok = bool(components) and target_pixels >= COLOR_PURITY * max(int(object_counts.sum()), 1)
    shapes = [classify_shape(c) for c in components if not is_clump(c)]
    return Verdict(
        count=len(components) == prompt.count,
        shape=bool(shapes) and all(s == prompt.shape for s in shapes),
        color=color_ok,
        background=None if prompt.background is None else found_background == prompt.background,
        found_count=len(components),
        found_color=dominant,
        found_background=found_background,
    )
