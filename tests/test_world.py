"""The shapes world: grammar, held-out split, renderer, oracle, rater, perturber."""

import random

import numpy as np
import pytest

from alignloop.world import (BACKGROUNDS, CATEGORIES, COLORS, SHAPES, Prompt, SimulatedRater, all_prompts, judge,
                             parse_prompt, perturb, render, sample_prompts, sample_scene, split)
from alignloop.world.grammar import (COUNT_WORDS, HELD_OUT_COLOR_SHAPE, HELD_OUT_COUNT_SHAPE,
                                     HELD_OUT_SHAPE_BACKGROUND)
from alignloop.world.render import BACKGROUND_RGB, GAP, OBJECT_RGB, size_range


def test_grammar_covers_lee_et_al_categories_and_sizes():
    prompts = all_prompts()
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert {p.count for p in prompts} == {1, 2, 3, 4, 5, 6}
    assert len(COLORS) >= 6 and len(SHAPES) >= 3 and len(BACKGROUNDS) >= 4
    assert len({p.text for p in prompts}) == len(prompts)  # texts are unambiguous


def test_every_prompt_text_parses_back():
    for p in all_prompts():
        assert parse_prompt(p.text) == p
        assert parse_prompt("  " + p.text.upper() + ". ") == p
    assert Prompt("color", 1, "circle", color="orange").text == "an orange circle"  # English articles
    assert parse_prompt("a photo of a dog") is None
    assert parse_prompt("six red circles on a gray background").count == 6
    assert parse_prompt("seven red circles") is None  # counts stop at six


def test_invalid_prompts_are_rejected_with_the_field():
    with pytest.raises(ValueError, match="count"):
        Prompt("count", 7, "circle")
    with pytest.raises(ValueError, match="color"):
        Prompt("color", 1, "circle", color="mauve")
    with pytest.raises(ValueError, match="names a color"):
        Prompt("combination", 2, "circle", color="red")


def test_held_out_split_is_disjoint_complete_and_uses_only_seen_words():
    seen, unseen = set(split("seen")), set(split("unseen"))
    assert seen and unseen and not seen & unseen
    assert seen | unseen == set(all_prompts())
    assert {p.category for p in unseen} == set(CATEGORIES)  # every category has held-out prompts
    for attribute in ("count", "shape", "color", "background"):  # every single word stays trainable
        assert {getattr(p, attribute) for p in seen} - {None} == {getattr(p, attribute) for p in all_prompts()} - {None}
    for p in seen:
        assert (p.color, p.shape) not in HELD_OUT_COLOR_SHAPE
        assert (p.shape, p.background) not in HELD_OUT_SHAPE_BACKGROUND
        assert (p.count, p.shape) not in HELD_OUT_COUNT_SHAPE


def test_training_renders_of_seen_prompts_never_show_a_held_out_pair():
    rng = random.Random(0)
    for p in sample_prompts(rng, 2000, "seen"):
        scene = sample_scene(p, rng)
        assert (scene.color, scene.shape) not in HELD_OUT_COLOR_SHAPE
        assert (scene.shape, scene.background) not in HELD_OUT_SHAPE_BACKGROUND
        assert len(scene.boxes) == p.count


def test_scenes_keep_objects_in_the_image_apart_and_sized_for_their_count():
    rng = random.Random(6)
    for count in COUNT_WORDS:
        smallest, largest = size_range(count)
        for _ in range(50):
            boxes = sample_scene(Prompt("count", count, "square"), rng).boxes
            assert len(boxes) == count
            for i, (x, y, size) in enumerate(boxes):
                assert smallest <= size <= largest and 0 <= x <= 32 - size and 0 <= y <= 32 - size
                for bx, by, bs in boxes[i + 1:]:  # at least GAP free pixels between any two, on some axis
                    assert x + size + GAP <= bx or bx + bs + GAP <= x or y + size + GAP <= by or by + bs + GAP <= y


def test_sample_prompts_balances_categories():
    counts = {c: 0 for c in CATEGORIES}
    for p in sample_prompts(random.Random(1), 4000, "seen"):
        counts[p.category] += 1
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_render_is_deterministic_given_a_seed():
    p = Prompt("combination", 3, "triangle", color="green", background="gray")
    a, b = render(p, random.Random(5)), render(p, random.Random(5))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_oracle_passes_ground_truth_renders():
    rng = random.Random(0)
    prompts = [rng.choice(all_prompts()) for _ in range(2000)]
    rate = np.mean([judge(render(p, rng, avoid_unseen=False), p).passed for p in prompts])
    assert rate >= 0.98


def test_oracle_fails_renders_paired_with_a_random_other_prompt():
    rng = random.Random(1)
    passed = []
    for _ in range(2000):
        p, q = rng.sample(all_prompts(), 2)
        passed.append(judge(render(p, rng, avoid_unseen=False), q).passed)
    assert np.mean(passed) <= 0.05


def test_oracle_reports_the_failing_aspect():
    rng = random.Random(2)
    image = render(Prompt("combination", 2, "square", color="red", background="black"), rng)
    verdict = judge(image, Prompt("combination", 3, "square", color="red", background="black"))
    assert verdict.aspects() == {"count": False, "color": True, "shape": True, "background": True}
    assert verdict.found_count == 2
    verdict = judge(image, "two blue squares on a white background")
    assert verdict.color is False and verdict.background is False
    verdict = judge(image, "two circles")  # color and background not named: not judged
    assert verdict.color is None and verdict.background is None and verdict.shape is False
    with pytest.raises(ValueError, match="not a prompt of the shapes world"):
        judge(image, "a cat")


def _canvas(background="black"):
    image = np.empty((32, 32, 3), np.uint8)
    image[:] = BACKGROUND_RGB[background]
    return image


def test_oracle_charges_objects_drawn_touching_to_the_count_not_the_shape():
    image = _canvas()
    image[2:11, 2:11] = image[2:11, 11:20] = OBJECT_RGB["red"]  # two 9 px squares drawn touching: one 9x18 clump
    image[20:29, 20:29] = OBJECT_RGB["red"]  # and a separate square
    verdict = judge(image, "three red squares on a black background")
    # The clump holds two squares, so three are found, but objects drawn touching fail the count anyway.
    assert verdict.found_count == 3 and verdict.aspects() == {"count": False, "color": True, "shape": True,
                                                                "background": True}
    assert judge(image, "three red circles on a black background").shape is False  # the separate one is judged
    image = _canvas()
    image[2:11, 2:20] = OBJECT_RGB["red"]  # a clump alone leaves no object to judge the shape on
    verdict = judge(image, "two red squares on a black background")
    assert verdict.found_count == 2 and verdict.aspects() == {
        "count": False, "color": True, "shape": False, "background": True}


def test_perturber_never_returns_the_original_and_always_contradicts_it():
    rng = random.Random(3)
    for p in all_prompts():
        perturbed = perturb(p, 8, rng)
        assert len(perturbed) == 8 and p not in perturbed
        assert all(q.category == p.category for q in perturbed)
        image = render(p, rng, avoid_unseen=False)
        assert not any(judge(image, q).passed for q in perturbed)
    assert len(set(perturb(all_prompts()[0], 8, rng))) == 8  # distinct while there are enough


def test_rater_without_noise_follows_the_oracle():
    rng = random.Random(4)
    rater = SimulatedRater(flip=0.0, seed=0)
    p = Prompt("color", 1, "circle", color="blue")
    assert rater.vote(render(p, rng, avoid_unseen=False), p) == "up"
    assert rater.vote(render(Prompt("color", 1, "circle", color="red"), rng), p) == "down"


def test_rater_noise_and_bias_shift_the_vote_rates():
    rng = random.Random(5)
    p = Prompt("count", 2, "square")
    image = render(p, rng)
    noisy = SimulatedRater(flip=0.2, seed=1)
    ups = np.mean([noisy.vote(image, p) == "up" for _ in range(2000)])
    assert 0.75 < ups < 0.85
    harsh = SimulatedRater(flip=0.0, bias={"count": -0.5}, seed=2)
    ups = np.mean([harsh.vote(image, p) == "up" for _ in range(2000)])
    assert 0.45 < ups < 0.55
    with pytest.raises(ValueError, match="flip"):
        SimulatedRater(flip=0.9)
    with pytest.raises(ValueError, match="bias"):
        SimulatedRater(bias={"mood": 0.1})


def test_a_vote_on_a_judged_image_is_the_same_draw_as_a_vote_on_the_image():
    """The experiment's users judge each shown image once and vote with vote_on: the votes of vote() exactly."""
    rng = random.Random(6)
    p = Prompt("count", 2, "square")
    images = [render(p, rng) for _ in range(3)] + [render(Prompt("count", 3, "square"), rng) for _ in range(3)]
    by_image, by_verdict = SimulatedRater(flip=0.3, seed=7), SimulatedRater(flip=0.3, seed=7)
    votes = [by_image.vote(image, p) for image in images * 20]
    assert votes == [by_verdict.vote_on(judge(image, p).passed, p.category) for image in images * 20]
    assert {"up", "down"} <= set(votes)
