"""The oracle reads degraded renders whose truth is known as a person would (issue 11's bounds)."""

import random

import numpy as np
import pytest

from alignloop.world import Prompt, judge, render
from alignloop.world.oracle import read_object
from alignloop.world.render import BACKGROUND_RGB, OBJECT_RGB
from alignloop.world.robustness import READING_CONDITIONS, _shape_coverage, _paint, blur, robustness_report


@pytest.fixture(scope="module")
def report():
    return robustness_report(images=250, seed=0)


@pytest.mark.parametrize("condition", READING_CONDITIONS)
def test_degraded_renders_pass_their_own_prompt_and_fail_others(report, condition):
    assert report[f"{condition}/own_prompt_passes"]["rate"] >= 0.98, report[f"{condition}/own_prompt_passes"]
    assert report[f"{condition}/other_prompt_passes"]["rate"] <= 0.05
    assert report[f"{condition}/perturbed_prompt_passes"]["rate"] <= 0.02


def test_touching_and_overlapping_pairs_fail_the_count(report):
    assert report["touching_pair/count_fails"]["rate"] >= 0.98
    assert report["overlapping_pair/count_fails"]["rate"] >= 0.98


def test_stretched_shapes_fail_the_shape(report):
    assert report["stretched/shape_fails"]["rate"] >= 0.95


def _image(background, color, *shapes):
    """shapes: (shape, height, width, top, left) boxes, painted crisp."""
    coverage = np.maximum.reduce([_shape_coverage(s, h, w, t, l) for s, h, w, t, l in shapes] + [np.zeros((32, 32))])
    return _paint(BACKGROUND_RGB[background], OBJECT_RGB[color], coverage)


def test_soft_edges_keep_the_shape_and_the_color():
    # A blurred red square on white: its edge pixels are pinkish grays, not "gray" or "orange".
    image = blur(_image("white", "red", ("square", 11, 11, 10, 10)), 0.7)
    verdict = judge(image, "a red square")
    assert verdict.passed and verdict.found_color == "red"
    assert judge(image, "a red circle").shape is False


def test_two_circles_fused_into_a_figure_eight_fail_the_count():
    image = _image("gray", "blue", ("circle", 10, 10, 8, 4), ("circle", 10, 10, 8, 12.5))  # overlapping by 1.5 px
    verdict = judge(image, "two blue circles on a gray background")
    assert verdict.count is False and verdict.found_count == 2
    assert judge(image, "a blue circle").count is False  # one clump is not one circle either


def test_distorted_objects_fail_the_shape():
    egg = _image("black", "green", ("circle", 15, 10, 8, 10))  # an egg-shaped "circle", aspect 1.5
    assert judge(egg, "a green circle").aspects() == {"count": True, "color": True, "shape": False}
    wide = _image("black", "yellow", ("square", 13, 20, 8, 6))  # a 20x13 "square"
    assert judge(wide, "a yellow square").shape is False
    assert judge(_image("black", "yellow", ("square", 13, 13, 8, 6)), "a yellow square").passed


def test_a_malformed_blob_fits_no_template():
    plus = np.zeros((32, 32), bool)
    plus[10:23, 14:18] = plus[14:18, 10:23] = True  # a plus sign: no square, circle or triangle
    reading = read_object(plus)
    assert not reading.well_formed and reading.fit < 0.72 and not reading.clump
    image = np.where(plus[..., None], OBJECT_RGB["cyan"], BACKGROUND_RGB["black"]).astype(np.uint8)
    assert judge(image, "a cyan circle").aspects() == {"count": True, "color": True, "shape": False}


def test_an_object_in_another_backgrounds_color_is_not_the_named_color():
    image = _image("white", "red", ("triangle", 11, 11, 10, 10))
    image[(image != BACKGROUND_RGB["white"]).any(-1)] = BACKGROUND_RGB["brown"]  # a brown triangle on white
    verdict = judge(image, "one red triangle on a white background")
    assert verdict.color is False and verdict.found_color == "brown"
    assert judge(image, "one triangle").passed  # an open color counts it


def test_ground_truth_renders_of_every_shape_read_as_well_formed():
    rng = random.Random(3)
    for shape in ("circle", "square", "triangle"):
        for count in (1, 6):
            image = render(Prompt("count", count, shape), rng, avoid_unseen=False)
            assert judge(blur(image, 0.7), Prompt("count", count, shape)).passed, (shape, count)
