"""The shapes world: a procedural prompt grammar, a renderer, an oracle judge and a simulated rater.

It plays the part of people and photographs so that the whole feedback loop can be measured on a small
CPU machine: the tiny bundled models are trained on it, and the oracle says whether an image is right.
"""

from alignloop.world.grammar import (BACKGROUNDS, CATEGORIES, COLORS, COUNT_WORDS, SHAPES, Prompt, all_prompts,
                                     parse_prompt, perturb, sample_prompts, split)
from alignloop.world.oracle import Verdict, judge
from alignloop.world.rater import SimulatedRater
from alignloop.world.render import IMAGE_SIZE, Scene, render, render_scene, sample_scene

__all__ = [
    "BACKGROUNDS", "CATEGORIES", "COLORS", "COUNT_WORDS", "IMAGE_SIZE", "SHAPES", "Prompt", "Scene",
    "SimulatedRater", "Verdict", "all_prompts", "judge", "parse_prompt", "perturb", "render", "render_scene",
    "sample_prompts", "sample_scene", "split",
]
