"""Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility") on the raw thumbs.

For each voted image at a random timestep t, with x_t its noised latent and ε the noise:

    g = ‖ε − ε_ref(x_t)‖² − ‖ε − ε_θ(x_t)‖²          implicit reward: how much better the LoRA denoises it
    z = max(mean_batch(g), 0), detached               the reference point
    loss = λ_up · (1 − σ(β·(g − z)))   for up-votes
           λ_down · (1 − σ(−β·(g − z))) for down-votes

ε_ref is the same UNet with the LoRA switched off. No reward model: the votes are the signal, so the method
learns from live traffic the day the votes arrive. The pre-training term (β_pre·denoising loss on renders of
seen prompts) keeps it from drifting where the votes say nothing.
"""

from pathlib import Path

import numpy as np
import torch

from alignloop.trainer.config import KtoConfig
from alignloop.trainer.finetune import LoraRun
from alignloop.trainer.finetune_data import Samples


def kto_loss(policy_error: torch.Tensor, base_error: torch.Tensor, up: torch.Tensor, config: KtoConfig,
             batch_mean=lambda x: x.detach().mean()) -> tuple:
    """(loss, stats) of a batch: errors [B] (mean squared, per sample), up [B] bool. `batch_mean` gives the
    reference point's mean: the run's `batch_mean` when B is one rank's shard of the global batch."""
    g = base_error - policy_error
    z = batch_mean(g).clamp(min=0)
    utility = torch.where(up, torch.sigmoid(config.beta * (g - z)), torch.sigmoid(-config.beta * (g - z)))
    weight = torch.where(up, config.up_weight, config.down_weight)
    loss = (weight * (1 - utility)).mean()
    # Means over the up- (down-) voted images of the whole batch, as ratios of batch means (NaN where none)
    stats = {"implicit_reward_up": (batch_mean(g * up) / batch_mean(up.float())).item(),
             "implicit_reward_down": (batch_mean(g * ~up) / batch_mean((~up).float())).item(),
             "reference_point": z.item()}
    return loss, stats


def train_kto(config: KtoConfig, samples: Samples, votes: np.ndarray, out_dir: Path, progress: bool = True) -> LoraRun:
    voted = np.flatnonzero(votes != 0)
    if len(voted) == 0 or not (votes > 0).any() or not (votes < 0).any():
        raise ValueError(f"Diffusion-KTO needs up- and down-votes; got {(votes > 0).sum()} up, {(votes < 0).sum()} down")
    run = LoraRun(config, out_dir, progress=progress)
    latents = torch.from_numpy(samples.latents).to(run.device)
    texts = [p.text for p in samples.prompts]
    guidance = config.guidance if config.guided_loss else None
    for _ in run.steps():
        # 1. A batch of voted images, uniformly (the up/down balance is the votes'); this rank's shard of it
        rows = run.shard(run.rng.choices(list(voted), k=config.batch_size))
        up = torch.tensor(votes[rows] > 0, device=run.device)
        # 2. Their denoising errors under the LoRA and the base, at one random timestep each
        policy_error, base_error = run.denoising_errors(latents[rows], [texts[i] for i in rows], guidance,
                                                        config.sample_min_timestep)
        kto, stats = kto_loss(policy_error, base_error, up, config, run.batch_mean)
        # 3. β_pre · the base's own loss on fresh renders of seen prompts
        pretrain_loss = run.pretraining_loss()
        loss = kto + config.pretrain_weight * pretrain_loss
        run.update(loss, {"kto_loss": kto.item(), "pretrain_loss": pretrain_loss.item(), **stats})
    return run
