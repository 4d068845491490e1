"""The shapes world: a procedural prompt grammar, a renderer, an oracle judge and a simulated rater.

It plays the part of people and photographs so that the whole feedback loop can be measured on a small
CPU machine: the tiny bundled models are trained on it, and the oracle says whether an image is right.
"""

import dataclasses
import hashlib
import json
import random

from alignloop.world.grammar import (BACKGROUNDS, CATEGORIES, COLORS, COUNT_WORDS, SHAPES, Prompt, all_prompts,
                                     parse_prompt, perturb, sample_prompts, split)
from alignloop.world.oracle import Verdict, judge
from alignloop.world.rater import SimulatedRater
from alignloop.world.render import IMAGE_SIZE, Scene, render, render_batch, render_scene, sample_scene

__all__ = [
    "BACKGROUNDS", "CATEGORIES", "COLORS", "COUNT_WORDS", "IMAGE_SIZE", "SHAPES", "Prompt", "Scene",
    "SimulatedRater", "Verdict", "all_prompts", "judge", "parse_prompt", "perturb", "render", "render_scene",
    "sample_prompts", "sample_scene", "split", "renders_signature", "world_signature",
]


def _fixed_renders() -> tuple:
    """(every prompt, a fixed render of each): what both signatures below read. Not cached: tests change the
    renderer to make another world."""
    prompts = list(all_prompts())
    images, _ = render_batch(prompts, random.Random(0), avoid_unseen=False)
    return prompts, images


def renders_signature() -> str:
    """A short hash of the prompts, their splits and the renders alone, without the oracle: what generator
    training depends on (so a generator survives a change to the oracle only; see restamp_generator)."""
    prompts, images = _fixed_renders()
    digest = hashlib.sha256(json.dumps([[p.text, p.unseen] for p in prompts]).encode())
    digest.update(images.tobytes())
    return digest.hexdigest()[:12]


def world_signature() -> str:
    """A short hash of how the world behaves: every prompt's text and split, a fixed render of each, and the
    oracle's reading of those renders, crisp and blurred as generated images are, against their own prompt and
    another. Saved with training checkpoints and exported models, so that a checkpoint of another world is never
    resumed, nor its models mixed (the CLIP trains on generator samples captioned by the oracle)."""
    from alignloop.world.robustness import blur

    prompts, images = _fixed_renders()
    readings = []
    for shown in (images, [blur(image, 0.7) for image in images]):
        readings += [dataclasses.astuple(judge(image, prompt)) for image, prompt in zip(shown, prompts)]
        readings += [dataclasses.astuple(judge(image, prompt)) for image, prompt in zip(shown, prompts[1:] + prompts[:1])]
    digest = hashlib.sha256(json.dumps([[p.text, p.unseen] for p in prompts] + readings).encode())
    digest.update(images.tobytes())
    return digest.hexdigest()[:12]
