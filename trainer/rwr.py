"""Reward-weighted likelihood (Lee et al. 2023, eq. 2) as a LoRA on the UNet.

    L(θ) = E_(x,z)~samples [ r(x, z) · ‖ε − ε̃_θ(x_t, t, z)‖² ] + β · E_(x,z)~renders [ ‖ε − ε_θ(x_t, t, z)‖² ]

The samples are the base model's own images of seen prompts with their final latents (no VAE round trip), r is
the vote where there is one (up 1, down 0: Lee et al.'s binary reward) and the learned reward elsewhere. A
batch is drawn with probability proportional to r rather than weighting a uniform batch: the same expectation up
to the factor 1/r̄ (r̄ the samples' mean reward), without steps spent on zero-weight samples. So β here weighs the
pre-training term against E[r·L]/r̄: Lee et al.'s β is this one times r̄. ε̃_θ is the classifier-free-guided
prediction that drew the samples (see alignloop.trainer.finetune for why the conditional branch alone must not be
fitted to them).
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from alignloop.trainer.config import RwrConfig
from alignloop.trainer.finetune import LoraRun
from alignloop.trainer.finetune_data import Samples


def sample_weights(votes: np.ndarray, learned: Optional[np.ndarray], config: RwrConfig) -> np.ndarray:
    """r per sample: the vote's reward where voted, the learned reward (in [0, 1]) ** power elsewhere."""
    weights = np.where(votes > 0, config.vote_weight_up, config.vote_weight_down).astype(np.float64)
    unvoted = votes == 0
    weights[unvoted] = 0.0 if learned is None else np.clip(learned[unvoted], 0, 1) ** config.learned_reward_power
    if not (weights > 0).any():
        raise ValueError("no sample has a positive reward: reward-weighted training has nothing to learn from")
    return weights


def train_rwr(config: RwrConfig, samples: Samples, weights: np.ndarray, out_dir: Path,
              progress: bool = True) -> LoraRun:
    run = LoraRun(config, out_dir, progress=progress)
    latents = torch.from_numpy(samples.latents).to(run.device)
    texts = [p.text for p in samples.prompts]
    population = range(len(samples))
    for _ in run.steps():
        # 1. Samples drawn in proportion to their reward (the global batch; this rank's shard of it)
        rows = run.shard(run.rng.choices(population, weights=weights, k=config.batch_size))
        batch, batch_texts = latents[rows], [texts[i] for i in rows]
        # 2. Their denoising loss, through the guided prediction that drew them
        guidance = config.guidance if config.guided_loss else None
        sample_loss = run.denoising_loss(batch, batch_texts, guidance, config.sample_min_timestep).mean()
        # 3. β · the base's own loss on fresh renders of seen prompts
        pretrain_loss = run.pretraining_loss()
        loss = sample_loss + config.pretrain_weight * pretrain_loss
        run.update(loss, {"sample_loss": sample_loss.item(), "pretrain_loss": pretrain_loss.item()})
    return run
