"""PPO on the denoising MDP (Zhang et al. 2024 §3 and Algorithm 1, after DDPO) as a LoRA on the UNet.

State (c, t, x_t), action x_{t-1}, policy DDIM's Gaussian step with η > 0 (alignloop.trainer.rollout). Each round:

    1. rollouts of seen prompts under the current LoRA, every step's latents and log-probability recorded (fp32)
    2. rewards of the final images: the learned reward, and a distribution-level reward (color diversity over
       the batch, Zhang et al. eq. 12) on prompts that leave the color open
    3. advantages per reward, normalized per prompt by a running tracker (the batch's statistics until a prompt
       has `tracker_min_count` rewards), clipped, then combined with the rewards' weights (Algorithm 1)
    4. `minibatches` updates; each re-evaluates `train_timesteps` random steps of its rollouts under the same
       sampler (asserted by step_log_prob) and minimizes the clipped surrogate
           max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)),  ρ = π_θ(x_{t-1} | x_t, c) / π_old(x_{t-1} | x_t, c)
       plus β·the base's denoising loss on fresh renders of seen prompts.

The first update of a round sees ρ = 1 (the policy that sampled); later ones a moved policy, so ε = 1e-4 (for
log-probs that are a mean over latent dimensions) keeps each round close to its rollouts.
"""

import collections
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from alignloop.trainer.config import PpoConfig
from alignloop.trainer.finetune import LoraRun


class PerPromptTracker:
    """Running reward statistics per prompt: advantages against a prompt's own history, so that an easy prompt's
    high rewards do not drown a hard prompt's improvements (DDPO). Until a prompt has `min_count` rewards, the
    batch's mean and standard deviation stand in."""

    def __init__(self, buffer: int, min_count: int):
        self.history = collections.defaultdict(lambda: collections.deque(maxlen=buffer))
        self.min_count = min_count

    def advantages(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        for prompt, reward in zip(prompts, rewards):
            self.history[prompt].append(reward)
        out = np.empty_like(rewards)
        for i, prompt in enumerate(prompts):
            seen = np.array(self.history[prompt])
            mean, std = (seen.mean(), seen.std()) if len(seen) >= self.min_count else (rewards.mean(), rewards.std())
            out[i] = (rewards[i] - mean) / (std + 1e-6)
        return out


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple:
    """(loss, stats): PPO's clipped objective over a batch [B]."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {"clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
             "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().item(),
             "ratio_max": ratio.max().item()}
    return loss, stats


def train_ppo(config: PpoConfig, prompts: Sequence, rewards: dict, out_dir: Path, progress: bool = True) -> LoraRun:
    """`prompts`: seen world Prompts to draw rollouts for; `rewards`: name -> (weight, fn(images, prompts) -> [B],
    applies(prompt) -> bool), e.g. {"learned": (1.0, learned, all), "color_diversity": (0.2, diversity, open)}."""
    from alignloop.trainer.finetune_data import check_seen
    from alignloop.trainer.rollout import sample_with_logprob, step_log_prob

    check_seen(prompts)
    run = LoraRun(config, out_dir, progress=progress)
    run.unet.eval()  # no dropout: the unchanged policy must agree with its own rollouts
    trackers = {name: PerPromptTracker(config.tracker_buffer, config.tracker_min_count) for name in rewards}
    sampler = dict(steps=config.sample_steps, guidance=config.guidance, eta=config.eta)
    round_size = config.batch_size * config.minibatches
    rollout, advantages = None, None
    for step in run.steps():
        update = step % config.minibatches
        if update == 0:
            # 1. Rollouts under the current policy
            groups = round_size // config.samples_per_prompt
            chosen = run.rng.sample(list(prompts), groups) if groups <= len(prompts) else \
                run.rng.choices(list(prompts), k=groups)
            batch = [p for p in chosen for _ in range(config.samples_per_prompt)]
            seeds = [run.rng.randrange(2**31) for _ in batch]
            rollout = sample_with_logprob(run.pipe, [p.text for p in batch], seeds, **sampler)
            # 2-3. Rewards, and their advantages per prompt, combined by weight
            advantages, reward_stats = combined_advantages(rollout.images, batch, rewards, trackers, config)
        # 4. One update on this minibatch at `train_timesteps` random steps of each of its rollouts
        rows = list(range(update * config.batch_size, (update + 1) * config.batch_size))
        part = rollout.subset(rows)
        part_advantages = advantages[rows].to(run.device)
        steps = range(len(rollout.timesteps))
        chosen = torch.tensor([run.rng.sample(steps, config.train_timesteps) for _ in rows]).T  # [train_timesteps, B]
        policy_loss, stats = 0.0, collections.defaultdict(float)
        for index in chosen:
            new = step_log_prob(run.pipe, part, index, **sampler)
            old = part.log_probs[torch.arange(len(rows)), index].to(run.device)
            loss, s = clipped_surrogate(new, old, part_advantages, config.clip_range)
            policy_loss = policy_loss + loss / config.train_timesteps
            for k, v in s.items():
                stats[k] += v / config.train_timesteps
        pretrain_loss = run.pretraining_loss()
        total = policy_loss + config.pretrain_weight * pretrain_loss
        run.update(total, {"policy_loss": policy_loss.item(), "pretrain_loss": pretrain_loss.item(), **stats,
                           **reward_stats})
    return run


def combined_advantages(images: torch.Tensor, prompts: Sequence, rewards: dict, trackers: dict,
                        config: PpoConfig) -> tuple:
    """(advantages [B] float32, stats): Σ_k w_k · clip(normalized A_k) over the rewards that apply to each prompt."""
    total = np.zeros(len(prompts))
    stats = {}
    for name, (weight, fn, applies) in rewards.items():
        mask = np.array([applies(p) for p in prompts])
        if not mask.any():
            continue
        rows = np.flatnonzero(mask)
        scores = np.asarray(fn(images[rows], [prompts[i].text for i in rows]), dtype=np.float64)
        advantage = trackers[name].advantages([prompts[i].text for i in rows], scores)
        total[rows] += weight * np.clip(advantage, -config.advantage_clip, config.advantage_clip)
        stats[f"reward_{name}"] = float(scores.mean())
    return torch.tensor(total, dtype=torch.float32), stats


def leaves_color_open(prompt) -> bool:
    return prompt.color is None


def default_rewards(learned: Callable, config: PpoConfig) -> dict:
    """The learned reward on every prompt, color diversity on prompts that leave the color open."""
    from alignloop.rewards import get_reward

    diversity = get_reward("color_diversity")
    return {"learned": (config.learned_reward_weight, lambda im, pr: learned(im, pr)[0].numpy(), lambda p: True),
            "color_diversity": (config.color_diversity_weight, lambda im, pr: diversity(im, pr)[0].numpy(),
                                leaves_color_open)}
