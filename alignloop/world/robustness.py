"""How well the oracle reads images whose truth is known, degraded the way generated images are.

Each condition draws scenes of random prompts, renders them with a degradation and judges them:

    rates = robustness_report(images=500, seed=0)   # {condition: {"rate": ..., "wants": ..., "images": ...}}

- `blur_0.5`, `blur_0.7`: Gaussian blur of sigma 0.5 / 0.7 px (the generator's softness is about 0.7);
- `noise_8`: additive Gaussian pixel noise of sigma 8 on 0..255;
- `color_shift`: object and background colors moved a quarter of the way to their nearest other palette entry;
- `subpixel`: objects drawn at a sub-pixel offset, with anti-aliased edges (area coverage);
- `blur_0.7_noise_8`: both at once;
  each of these is judged against its own prompt (should pass), a random other prompt and a one-attribute
  perturbation of its prompt (should fail);
- `touching`, `overlapping`: two objects of one shape moved together until their pixels touch, or on until
  they overlap by 5-40% of their side, judged against "two <shape>s" (the count should fail);
- `stretched`: every object of a scene stretched to an aspect of 1.4-2.0 (the shape should fail).

`alignloop world oracle-check --json` prints the report; tests/test_oracle_robustness.py holds the bounds.
"""

import random
from typing import Callable

import numpy as np
from scipy import ndimage

from alignloop.world.grammar import SHAPES, Prompt, all_prompts, perturb
from alignloop.world.oracle import judge
from alignloop.world.render import BACKGROUND_RGB, GAP, IMAGE_SIZE, MIN_SIZE, OBJECT_RGB, render_scene, sample_scene

_PALETTE = {**OBJECT_RGB, **BACKGROUND_RGB}


def _shape_coverage(shape: str, height: float, width: float, top: float, left: float, supersample: int = 1) -> np.ndarray:
    """Share of each pixel of the image covered by the shape in the box (top, left, height, width), [32, 32];
    supersample=1 samples pixel centres exactly as the renderer does."""
    n = IMAGE_SIZE * supersample
    centres = (np.arange(n) + 0.5) / supersample
    v = (centres[:, None] - top) / height  # 0..1 down the box
    u = (centres[None, :] - left) / width  # 0..1 across the box
    inside = (v >= 0) & (v <= 1) & (u >= 0) & (u <= 1)
    if shape == "circle":
        inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        inside &= np.abs(u - 0.5) <= v / 2
    elif shape != "square":
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(IMAGE_SIZE, supersample, IMAGE_SIZE, supersample).mean((1, 3))


def _paint(background: tuple, color: tuple, coverage: np.ndarray) -> np.ndarray:
    image = np.asarray(background, np.float32) + coverage[..., None] * (np.asarray(color, np.float32) - background)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    out = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="nearest")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.round(image + rng.normal(0, sigma, image.shape)), 0, 255).astype(np.uint8)


def shifted_color(name: str, share: float = 0.25) -> tuple:
    """The palette color `name` moved `share` of the way to its nearest other palette entry."""
    rgb = np.asarray(_PALETTE[name], np.float32)
    others = [np.asarray(c, np.float32) for other, c in _PALETTE.items() if other != name]
    nearest = min(others, key=lambda c: float(((c - rgb) ** 2).sum()))
    return tuple(rgb + share * (nearest - rgb))


def render_degraded(scene, condition: str, rng: random.Random) -> np.ndarray:
    """The scene rendered under one of the reading conditions (see the module docstring)."""
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    if condition == "crisp":
        return render_scene(scene)
    if condition.startswith("blur_"):
        sigma = float(condition.split("_")[1])
        image = blur(render_scene(scene), sigma)
        return add_noise(image, 8, noise_rng) if condition.endswith("noise_8") else image
    if condition == "noise_8":
        return add_noise(render_scene(scene), 8, noise_rng)
    if condition in ("color_shift", "subpixel"):
        background = shifted_color(scene.background) if condition == "color_shift" else BACKGROUND_RGB[scene.background]
        color = shifted_color(scene.color) if condition == "color_shift" else OBJECT_RGB[scene.color]
        coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
        for x, y, size in scene.boxes:
            dy, dx = (rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)) if condition == "subpixel" else (0.0, 0.0)
            supersample = 8 if condition == "subpixel" else 1
            coverage = np.maximum(coverage, _shape_coverage(scene.shape, size, size, y + dy, x + dx, supersample))
        return _paint(background, color, coverage)
    raise ValueError(f"unknown condition {condition!r}")


def _pair_image(shape: str, rng: random.Random, overlap: bool) -> np.ndarray:
    """Two objects of one shape and size side by side along a random axis, with a random offset across (at
    most 30% of their side), moved together until they touch (their pixels form one 4-connected component),
    and for `overlap` on by 5-40% of their side."""
    size = rng.randint(MIN_SIZE, 11)
    across = size * rng.uniform(-0.3, 0.3)
    stacked = rng.random() < 0.5

    def coverage(step):
        boxes = [(max(0.0, -across), 0.0), (max(0.0, across), step)]
        if stacked:
            boxes = [(x, y) for y, x in boxes]
        return np.maximum(*(_shape_coverage(shape, size, size, 1 + t, 1 + l) for t, l in boxes))

    step = size + 2.0
    while ndimage.label(coverage(step) > 0)[1] > 1:
        step -= 0.25
    if overlap:
        step -= size * rng.uniform(0.05, 0.4)
    color, background = rng.choice(list(OBJECT_RGB)), rng.choice(list(BACKGROUND_RGB))
    return _paint(BACKGROUND_RGB[background], OBJECT_RGB[color], coverage(step))


def _stretched_image(prompt: Prompt, rng: random.Random) -> np.ndarray:
    """The prompt's scene with every object stretched along one axis to an aspect of 1.4-2.0."""
    color = prompt.color or rng.choice(list(OBJECT_RGB))
    background = prompt.background or rng.choice(list(BACKGROUND_RGB))
    for _ in range(1000):
        boxes = []
        for _ in range(prompt.count):
            side = rng.randint(MIN_SIZE, 11 if prompt.count > 1 else 13)
            long = min(side * rng.uniform(1.4, 2.0), IMAGE_SIZE - 2)
            height, width = (long, side) if rng.random() < 0.5 else (side, long)
            top, left = rng.uniform(0, IMAGE_SIZE - height), rng.uniform(0, IMAGE_SIZE - width)
            if all(top + height + GAP <= t or t + h + GAP <= top or left + width + GAP <= l or l + w + GAP <= left
                   for t, l, h, w in boxes):
                boxes.append((top, left, height, width))
        if len(boxes) == prompt.count:
            coverage = np.maximum.reduce([_shape_coverage(prompt.shape, h, w, t, l) for t, l, h, w in boxes])
            return _paint(BACKGROUND_RGB[background], OBJECT_RGB[color], coverage)
    raise RuntimeError(f"could not place {prompt.count} stretched objects")


READING_CONDITIONS = ("crisp", "blur_0.5", "blur_0.7", "noise_8", "blur_0.7_noise_8", "color_shift", "subpixel")


def robustness_report(images: int = 500, seed: int = 0, progress: Callable = iter) -> dict:
    """{condition: {"rate", "wants", "images"}}: the share of images passing (for `own`) or failing the aspect
    the condition tests; `wants` says which way is right."""
    rng = random.Random(seed)
    prompts = list(all_prompts())
    report = {}

    def record(name, values, wants):
        report[name] = {"rate": round(float(np.mean(values)), 4), "wants": wants, "images": len(values)}

    for condition in progress(READING_CONDITIONS):
        own, other, perturbed = [], [], []
        for _ in range(images):
            prompt = rng.choice(prompts)
            image = render_degraded(sample_scene(prompt, rng, avoid_unseen=False), condition, rng)
            own.append(judge(image, prompt).passed)
            other.append(judge(image, rng.choice([q for q in prompts if q != prompt])).passed)
            perturbed.append(judge(image, perturb(prompt, 1, rng)[0]).passed)
        record(f"{condition}/own_prompt_passes", own, "high")
        record(f"{condition}/other_prompt_passes", other, "low")
        record(f"{condition}/perturbed_prompt_passes", perturbed, "low")
    for name, overlap in (("touching", False), ("overlapping", True)):
        fails = []
        for _ in range(images):
            shape = rng.choice(SHAPES)
            fails.append(not judge(_pair_image(shape, rng, overlap), Prompt("count", 2, shape)).count)
        record(f"{name}_pair/count_fails", fails, "high")
    fails = []
    for _ in range(images):
        prompt = rng.choice([p for p in prompts if p.count <= 2])
        fails.append(not judge(_stretched_image(prompt, rng), prompt).shape)
    record("stretched/shape_fails", fails, "high")
    return report
