"""Best-k-of-n rejection sampling: sample n candidates, score them with the reward model, keep the best k.

    sampler = Sampler(DiffusionBatcher(pipe), RewardSlot(RewardScorer(clip)), explore_probability=0.25)
    best = sampler.sample("three red circles on a gray background", n=16, k=4, steps=20, guidance=7.5, seed=42)
    best.images      # [k, 3, H, W] float32 in [0, 1], in the order shown
    best.rewards     # k floats, descending; best.candidate_rewards: all n, in candidate order
    best.reward_model, best.shown_probabilities, best.explored

The sampler depends on two small interfaces: something that turns (prompt, seeds, steps, guidance) into
images (`ImageSource`, the micro-batcher in production) and a reward slot whose `current()` is a `Scorer`
(alignloop.rewards.RewardScorer: CLIP embeddings and a head, CLIP cosine similarity until a head is live)
and its name. Unit tests pass fakes for both. A seeded request is reproducible: candidate i gets its own
seed derived from (seed, i), independent of n's split into passes and of the requests it shares passes with;
the exploration draw is seeded by it too.

Exploration (selection bias): users only vote on what they are shown, and without exploration that is only
what the current reward ranks top, so the reward model never learns from what it ranks low. With probability
`explore_probability` per request (and k < n), the last of the k slots shows a candidate drawn uniformly from
the k-th best and everything below it instead of the k-th best. Each shown image carries the probability it
had of being shown, so a trainer can weight votes by its inverse.
"""

import hashlib
import random
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from alignloop.serving.batching import SampledImages
from alignloop.serving.schemas import MAX_N, MAX_SEED


class ImageSource(Protocol):
    def submit(self, prompt: str, seeds: list[int], steps: int, guidance: float,
               adapter: str = "base") -> "Future[SampledImages]": ...


class Scorer(Protocol):
    def score(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Rewards [B] (float, CPU) of images [B, 3, H, W] in [0, 1] for the prompt; higher is better."""


@dataclass(frozen=True)
class BestOfN:
    seed: int  # the request seed (given, or drawn)
    images: torch.Tensor  # [k, 3, H, W] float32 in [0, 1], in the order shown (best first)
    rewards: list[float]  # k, descending
    indices: list[int]  # k candidate indices (0..n-1) of the returned images
    seeds: list[int]  # k per-candidate seeds of the returned images
    shown_probabilities: list[float]  # k: the chance each returned candidate had of being shown
    explored: bool  # the last slot was drawn below the top k
    reward_model: str  # what scored the candidates: "clip" or "reward:<registry version>"
    adapter: str  # the LoRA adapter version that drew every candidate ("base" = none)
    candidate_rewards: list[float]  # n, in candidate order
    queue_s: float
    sampling_s: float
    scoring_s: float


def candidate_seeds(seed: int, n: int) -> list[int]:
    """Per-candidate seeds: a hash of (seed, i), so seeds s and s+1 share no candidates."""
    return [int.from_bytes(hashlib.sha256(f"alignloop:{seed}:{i}".encode()).digest()[:8], "big") & MAX_SEED
            for i in range(n)]


def choose_shown(rewards: torch.Tensor, k: int, explore_probability: float, rng: random.Random):
    """(indices, shown probabilities, explored): the k best by reward, except that with probability
    `explore_probability` the last slot goes to a candidate drawn uniformly from the k-th best and below."""
    n = rewards.numel()
    _, order = top_k(rewards, n)  # every candidate, best first
    if k == n or explore_probability <= 0:
        return order[:k], [1.0] * k, False
    pool = order[k - 1:]  # who may fill the last slot
    explored = rng.random() < explore_probability
    last = rng.choice(pool) if explored else order[k - 1]
    by_draw = explore_probability / len(pool)
    return (order[:k - 1] + [last], [1.0] * (k - 1) + [by_draw + (1 - explore_probability) * (last == order[k - 1])],
            explored)


def top_k(rewards: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The k best (values, indices), descending, ties to the lower index; alignloop.kernels' grouped top-k."""
    from alignloop.kernels import grouped_topk

    values, indices = grouped_topk(rewards.reshape(-1), rewards.numel(), k)  # one group of n: [1, k] each
    return values[0].tolist(), indices[0].tolist()


class RewardSource(Protocol):
    def current(self) -> tuple[Scorer, str]:
        """(scorer, its name) to score one request with: serving.reward_slot.RewardSlot."""


class Sampler:
    def __init__(self, source: ImageSource, reward: RewardSource, timeout_s: float = 600.0,
                 explore_probability: float = 0.0):
        if not 0.0 <= explore_probability <= 1.0:
            raise ValueError(f"explore_probability must be in [0, 1], got {explore_probability}")
        self.source = source
        self.reward = reward
        self.timeout_s = timeout_s
        self.explore_probability = explore_probability

    def sample(self, prompt: str, n: int, k: int, steps: int, guidance: float,
               seed: Optional[int] = None, adapter: str = "base") -> BestOfN:
        # 1. Check inputs (the HTTP schema already did; this guards in-process callers)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if not 1 <= k <= n <= MAX_N:
            raise ValueError(f"need 1 <= k <= n <= {MAX_N}, got k={k}, n={n}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {seed}")

        # 2. Seeds: one per candidate
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        seeds = candidate_seeds(seed, n)

        # 3. Sample n candidates with the adapter (in passes shared with concurrent requests of that adapter)
        sampled = self.source.submit(prompt, seeds, steps, guidance, adapter=adapter).result(timeout=self.timeout_s)
        images = sampled.images  # [n, 3, H, W]
        assert images.shape[0] == n, f"image source returned {images.shape[0]} images for n={n}"

        # 4. Score every candidate, with the reward model current now (read once: one model per request)
        started = time.monotonic()
        scorer, reward_model = self.reward.current()
        rewards = scorer.score(images, prompt).float().cpu().reshape(-1)  # [n]
        if rewards.shape[0] != n or not torch.isfinite(rewards).all():
            raise RuntimeError(f"scorer returned {rewards.shape[0]} rewards for {n} images, finite: "
                               f"{bool(torch.isfinite(rewards).all())}")

        # 5. Rank: the best k, the last slot sometimes explored
        indices, shown, explored = choose_shown(rewards, k, self.explore_probability,
                                                random.Random(f"explore:{seed}"))
        scoring_s = time.monotonic() - started
        return BestOfN(seed=seed, images=images[indices], rewards=rewards[indices].tolist(), indices=indices,
                       seeds=[seeds[i] for i in indices], shown_probabilities=shown, explored=explored,
                       reward_model=reward_model, adapter=adapter, candidate_rewards=rewards.tolist(),
                       queue_s=sampled.queue_s, sampling_s=sampled.sampling_s, scoring_s=scoring_s)


def load_sampler(config, on_pass=None) -> tuple[Sampler, "DiffusionBatcher"]:  # noqa: F821
    """Load the generator and CLIP of `config` (a ServingConfig) and wire them into a Sampler that ranks by CLIP
    score; `sampler.reward` is the slot a RegistryFollower keeps on the registry's live reward model, and
    `batcher.slots` the adapter slots (serving.adapter_slots) a RolloutFollower keeps on the rollout's adapters."""
    from alignloop.models import load_clip, load_generator, resolve_device_dtype
    from alignloop.rewards import RewardScorer
    from alignloop.serving.batching import DiffusionBatcher

    device, dtype = resolve_device_dtype(config.device or None, config.dtype or None)
    pipe = load_generator(config.generator, device=device, dtype=dtype)
    clip = load_clip(config.clip, checkpoint=config.clip_checkpoint or None, device=device, dtype=dtype)
    from alignloop.serving.reward_slot import RewardSlot

    slot = RewardSlot(RewardScorer(clip, head=None, backend=config.scorer_backend))
    batcher = DiffusionBatcher(pipe, config.max_batch_images, config.batch_wait_ms, config.cross_request_batching,
                               on_pass=on_pass, max_queued_images=config.max_queued_images)
    from alignloop.serving.adapter_slots import AdapterSlots

    batcher.slots = AdapterSlots(pipe, batcher, config.max_adapters, config.max_adapter_rank)
    batcher.activate = batcher.slots.activate  # the pass's adapter, set on the batcher thread
    return Sampler(batcher, slot, timeout_s=config.timeout_s, explore_probability=config.explore_probability), batcher
