"""Reward-gradient fine-tuning with a KL term (the student report's eq. 5, after ReFL) as a LoRA on the UNet.

Each step, for a batch of seen prompts:

    1. run the sampler (DDIM, η > 0) without gradients and keep x_t at a step drawn from the last quarter
    2. at that step only, with gradients: the guided ε under the LoRA, the predicted x̂0, decoded by the VAE, scored
       by the learned reward through the CLIP image tower and the head (all differentiable)
    3. KL between the step's Gaussians under the LoRA and under the base: equal variances, so
       KL = ‖μ_θ − μ_base‖² / 2σ_t² (a mean over latent dimensions, the log-probabilities' convention)
    4. minimize −α·reward + β_KL·KL (+ β_pre·the base's denoising loss on renders, off by default)

It follows the reward's gradient, so it is the method most exposed to reward hacking: the KL term is its
anchor, and its fidelity and diversity are reported beside its pass rate.
"""

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from alignloop.trainer.config import ReflConfig
from alignloop.trainer.finetune import LoraRun


class DifferentiableReward:
    """The live reward as a function of pixels with gradients: the scorer's own graph (CLIP's image tower,
    normalized as its preprocessing does, and the head; with head=None the CLIP score, what serving ranks by
    until a head is live) on images [B, 3, H, W] in [0, 1], one prompt each."""

    def __init__(self, clip, head=None):
        from alignloop.kernels.onnx_scorer import ScorerGraph
        from alignloop.rewards.scorer import clip_normalization

        self.clip = clip
        head = None if head is None else head.float().eval()
        self.graph = ScorerGraph(clip.model, *clip_normalization(clip), head).to(clip.device)
        self.graph.requires_grad_(False)  # gradients reach the pixels, never CLIP or the head

    @property
    def is_clip_score(self) -> bool:
        return self.graph.head is None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        size = self.clip.image_size
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        return self.graph(images.to(self.clip.dtype), self.clip.encode_texts(list(prompts)).float())


def train_refl(config: ReflConfig, prompts: Sequence, reward: DifferentiableReward, out_dir: Path,
               progress: bool = True) -> LoraRun:
    from alignloop.trainer.finetune_data import check_seen
    from alignloop.trainer.rollout import (ddim_mean_std, ddim_scheduler, predict_noise, predicted_x0,
                                           sample_with_logprob)

    check_seen(prompts)
    if not 0 < config.last_fraction <= 1:
        raise ValueError(f"last_fraction must be in (0, 1], got {config.last_fraction}")
    run = LoraRun(config, out_dir, progress=progress)
    run.unet.eval()
    scheduler = ddim_scheduler(run.pipe, config.sample_steps)
    steps = config.sample_steps
    first = steps - max(1, round(steps * config.last_fraction))
    for _ in run.steps():
        # 1. The trajectory without gradients, x_t at a step in the last quarter (this rank's shard of the batch:
        #    each image has its own seed, so a shard's trajectories are the single process's)
        batch = run.rng.choices(list(prompts), k=config.batch_size)
        seeds = run.shard([run.rng.randrange(2**31) for _ in batch])
        batch = run.shard(batch)
        rollout = sample_with_logprob(run.pipe, [p.text for p in batch], seeds, steps, config.guidance,
                                      eta=config.eta, log_probs=False)
        index = run.rng.randrange(first, steps)
        latents = rollout.latents[:, index].to(run.device)
        t = rollout.timesteps[index].repeat(len(batch)).to(run.device)
        embeds, negative = rollout.prompt_embeds.to(run.device), rollout.negative_embeds.to(run.device)
        # 2. That step with gradients: x̂0, decoded, scored
        eps = predict_noise(run.unet, latents, t, embeds, negative, config.guidance)
        x0, _ = predicted_x0(scheduler, eps, latents, run.alphas_cumprod[t].view(-1, 1, 1, 1))  # any prediction_type
        vae = run.pipe.vae
        images = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        score = reward(images, [p.text for p in batch]).mean()
        # 3. KL to the base's step
        mean, std = ddim_mean_std(scheduler, eps, latents, t, config.eta)
        with torch.no_grad(), run.base():
            base_eps = predict_noise(run.unet, latents, t, embeds, negative, config.guidance)
            base_mean, _ = ddim_mean_std(scheduler, base_eps, latents, t, config.eta)
        kl = ((mean - base_mean) ** 2 / (2 * std ** 2)).mean()
        # 4. The objective
        pretrain_loss = run.pretraining_loss()
        alpha = config.clip_reward_weight if reward.is_clip_score else config.reward_weight
        loss = -alpha * score + config.kl_weight * kl + config.pretrain_weight * pretrain_loss
        run.update(loss, {"reward": score.item(), "kl": kl.item(), "pretrain_loss": pretrain_loss.item(),
                          "step_index": index})
    return run
