"""Best-k-of-n rejection sampling: sample n candidates, score them with the reward model, keep the best k.

    sampler = Sampler(DiffusionBatcher(pipe), RewardScorer(clip))
    best = sampler.sample("three red circles on a gray background", n=16, k=4, steps=20, guidance=7.5, seed=42)
    best.images      # [k, 3, H, W] float32 in [0, 1], best first
    best.rewards     # k floats, descending; best.candidate_rewards: all n, in candidate order

The sampler depends on two small interfaces: something that turns (prompt, seeds, steps, guidance) into
images (`ImageSource`, the micro-batcher in production) and a `Scorer` (alignloop.reward.RewardScorer: CLIP
embeddings and a head, CLIP cosine similarity until a head is trained). Unit tests pass fakes for both.
A seeded request is reproducible: candidate i gets its own seed derived from (seed, i), independent of n's
split into passes and of the requests it shares passes with.
"""

import hashlib
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from alignloop.serving.batching import SampledImages
from alignloop.serving.schemas import MAX_N, MAX_SEED


class ImageSource(Protocol):
    def submit(self, prompt: str, seeds: list[int], steps: int, guidance: float) -> "Future[SampledImages]": ...


class Scorer(Protocol):
    def score(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Rewards [B] (float, CPU) of images [B, 3, H, W] in [0, 1] for the prompt; higher is better."""


@dataclass(frozen=True)
class BestOfN:
    seed: int  # the request seed (given, or drawn)
    images: torch.Tensor  # [k, 3, H, W] float32 in [0, 1], best first
    rewards: list[float]  # k, descending
    indices: list[int]  # k candidate indices (0..n-1) of the returned images
    seeds: list[int]  # k per-candidate seeds of the returned images
    candidate_rewards: list[float]  # n, in candidate order
    queue_s: float
    sampling_s: float
    scoring_s: float


def candidate_seeds(seed: int, n: int) -> list[int]:
    """Per-candidate seeds: a hash of (seed, i), so seeds s and s+1 share no candidates."""
    return [int.from_bytes(hashlib.sha256(f"alignloop:{seed}:{i}".encode()).digest()[:8], "big") & MAX_SEED
            for i in range(n)]


def top_k(rewards: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The k best (values, indices), descending, ties to the lower index; alignloop.kernels' grouped top-k."""
    from alignloop.kernels import grouped_topk

    values, indices = grouped_topk(rewards.reshape(-1), rewards.numel(), k)  # one group of n: [1, k] each
    return values[0].tolist(), indices[0].tolist()


class Sampler:
    def __init__(self, source: ImageSource, scorer: Scorer, timeout_s: float = 600.0):
        self.source = source
        self.scorer = scorer
        self.timeout_s = timeout_s

    def sample(self, prompt: str, n: int, k: int, steps: int, guidance: float,
               seed: Optional[int] = None) -> BestOfN:
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

        # 3. Sample n candidates (in passes shared with concurrent requests)
        sampled = self.source.submit(prompt, seeds, steps, guidance).result(timeout=self.timeout_s)
        images = sampled.images  # [n, 3, H, W]
        assert images.shape[0] == n, f"image source returned {images.shape[0]} images for n={n}"

        # 4. Score every candidate
        started = time.monotonic()
        rewards = self.scorer.score(images, prompt).float().cpu().reshape(-1)  # [n]
        if rewards.shape[0] != n or not torch.isfinite(rewards).all():
            raise RuntimeError(f"scorer returned {rewards.shape[0]} rewards for {n} images, finite: "
                               f"{bool(torch.isfinite(rewards).all())}")

        # 5. Rank: the best k
        values, indices = top_k(rewards, k)
        scoring_s = time.monotonic() - started
        return BestOfN(seed=seed, images=images[indices], rewards=values, indices=indices,
                       seeds=[seeds[i] for i in indices], candidate_rewards=rewards.tolist(),
                       queue_s=sampled.queue_s, sampling_s=sampled.sampling_s, scoring_s=scoring_s)


def load_sampler(config, on_pass=None) -> tuple[Sampler, "DiffusionBatcher"]:  # noqa: F821
    """Load the generator and CLIP of `config` (a ServingConfig) and wire them into a Sampler."""
    from alignloop.models import load_clip, load_generator, resolve_device_dtype
    from alignloop.reward import RewardScorer
    from alignloop.serving.batching import DiffusionBatcher

    device, dtype = resolve_device_dtype(config.device or None, config.dtype or None)
    pipe = load_generator(config.generator, device=device, dtype=dtype)
    clip = load_clip(config.clip, checkpoint=config.clip_checkpoint or None, device=device, dtype=dtype)
    scorer = RewardScorer(clip, head=None, backend=config.scorer_backend)
    batcher = DiffusionBatcher(pipe, config.max_batch_images, config.batch_wait_ms, config.cross_request_batching,
                               on_pass=on_pass)
    return Sampler(batcher, scorer, timeout_s=config.timeout_s), batcher
