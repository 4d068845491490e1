"""The sampler on the bundled tiny pipeline and CLIP (in-process, no server)."""

import pytest
import torch

from alignloop.models import load_clip, load_generator
from alignloop.rewards import RewardScorer
from alignloop.serving.batching import DiffusionBatcher
from alignloop.serving.reward_slot import RewardSlot
from alignloop.serving.sampler import Sampler, candidate_seeds

PROMPT = "three red circles on a gray background"


@pytest.fixture(scope="module")
def pipe():
    return load_generator(device="cpu")


def test_seeded_images_do_not_depend_on_batching(pipe):
    """Per-candidate generators: the same seeds give the same images whether the candidates run alone in
    passes of 2 or share a pass of 16 with another request's."""
    seeds = candidate_seeds(3, 5)
    outputs = []
    for max_batch in (2, 16):
        batcher = DiffusionBatcher(pipe, max_batch_images=max_batch, wait_ms=50)
        try:
            other = batcher.submit("one green triangle", candidate_seeds(9, 3), 2, 7.5)
            mine = batcher.submit(PROMPT, seeds, 2, 7.5)
            outputs.append(mine.result(timeout=600).images)
            other.result(timeout=600)
        finally:
            batcher.close()
    assert outputs[0].shape == (5, 3, 32, 32)
    # Batched convolutions may differ in the last float bits between batch sizes: well under one 8-bit level.
    assert (outputs[0] - outputs[1]).abs().max().item() < 0.5 / 255


def test_best_k_of_n_with_the_clip_scorer(pipe):
    scorer = RewardScorer(load_clip(device="cpu"))
    batcher = DiffusionBatcher(pipe, max_batch_images=8, wait_ms=0)
    try:
        best = Sampler(batcher, RewardSlot(scorer)).sample(PROMPT, n=6, k=2, steps=2, guidance=7.5, seed=11)
    finally:
        batcher.close()
    direct = scorer.score(best.images, PROMPT)
    assert torch.allclose(direct, torch.tensor(best.rewards), atol=1e-5)  # the returned images carry their rewards
    assert best.rewards == sorted(best.candidate_rewards, reverse=True)[:2]
    assert all(-1 <= r <= 1 for r in best.candidate_rewards)  # CLIP cosine until a head is trained
    assert best.reward_model == "clip"
