"""Renders world scenes: flat-colored shapes on a flat background, 32x32 RGB."""

import dataclasses
import random
from typing import Optional

import numpy as np

from alignloop.world.grammar import (BACKGROUNDS, COLORS, COUNT_WORDS, HELD_OUT_COLOR_SHAPE, HELD_OUT_SHAPE_BACKGROUND,
                                     Prompt)

IMAGE_SIZE = 32
OBJECT_RGB = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 225, 30), "green": (30, 170, 50),
    "cyan": (30, 200, 220), "blue": (40, 70, 225), "purple": (140, 50, 190),
}
BACKGROUND_RGB = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (125, 125, 125),
                  "brown": (115, 75, 40)}
assert set(OBJECT_RGB) == set(COLORS) and set(BACKGROUND_RGB) == set(BACKGROUNDS)

# Object side in pixels: large enough that a generator's rounded corners leave a square's fill above the
# oracle's 0.88 (at 7 px, losing 3 pixels per corner made squares read as circles). Crowded scenes use
# smaller objects: six of 9 px fill two rows of three, which leaves only a pixel or two of play.
MIN_SIZE, MAX_SIZE = 9, 13
LARGEST_SIZE_BY_COUNT = {1: MAX_SIZE, 2: MAX_SIZE, 3: 11, 4: 11, 5: MIN_SIZE, 6: MIN_SIZE}
assert set(LARGEST_SIZE_BY_COUNT) == set(COUNT_WORDS)
GAP = 2  # free pixels between objects, so that they stay separate components


def size_range(count: int) -> tuple:
    """(smallest, largest) object side for a scene of `count` objects."""
    return MIN_SIZE, LARGEST_SIZE_BY_COUNT[count]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A concrete scene: every attribute decided, with object boxes (x, y, size)."""

    shape: str
    color: str
    background: str
    boxes: tuple


def _draw_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        r = size / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base on the bottom row
        half_width = (yy / size) * (size / 2)
        return np.abs(xx - size / 2) <= half_width
    raise ValueError(f"unknown shape {shape!r}")


def sample_scene(prompt: Prompt, rng: random.Random, avoid_unseen: bool = True) -> Scene:
    """Decide what the prompt leaves open. With avoid_unseen, open attributes never form a held-out pair,
    so that renders of seen prompts (data for the feedback loop) never show an unseen combination."""
    colors = [prompt.color] if prompt.color else [
        c for c in COLORS if not (avoid_unseen and (c, prompt.shape) in HELD_OUT_COLOR_SHAPE)]
    backgrounds = [prompt.background] if prompt.background else [
        b for b in BACKGROUNDS if not (avoid_unseen and (prompt.shape, b) in HELD_OUT_SHAPE_BACKGROUND)]
    color, background = rng.choice(colors), rng.choice(backgrounds)
    smallest, largest = size_range(prompt.count)
    for _ in range(1000):
        boxes = []
        for _ in range(prompt.count):
            size = rng.randint(smallest, largest)
            for _ in range(100):
                x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
                if all(x + size + GAP <= bx or bx + bs + GAP <= x or y + size + GAP <= by or by + bs + GAP <= y
                       for bx, by, bs in boxes):
                    boxes.append((x, y, size))
                    break
        if len(boxes) == prompt.count:
            return Scene(prompt.shape, color, background, tuple(boxes))
    raise RuntimeError(f"could not place {prompt.count} objects")  # 6 of 9 px take ~25 tries


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 array (32, 32, 3)."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUND_RGB[scene.background]
    for x, y, size in scene.boxes:
        mask = _draw_mask(scene.shape, size)
        image[y:y + size, x:x + size][mask] = OBJECT_RGB[scene.color]
    return image


def render(prompt: Prompt, rng: Optional[random.Random] = None, avoid_unseen: bool = True) -> np.ndarray:
    """A ground-truth image for the prompt."""
    return render_scene(sample_scene(prompt, rng or random.Random(), avoid_unseen))


def render_batch(prompts, rng: random.Random, avoid_unseen: bool = True):
    """(images uint8 [B, 32, 32, 3], scenes) for a list of prompts."""
    scenes = [sample_scene(p, rng, avoid_unseen) for p in prompts]
    return np.stack([render_scene(s) for s in scenes]), scenes
