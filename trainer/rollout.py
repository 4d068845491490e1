"""PPO's sampler: DDIM with eta > 0 that records every step's latents and the log-probability of each step.

    rollout = sample_with_logprob(pipe, prompts, seeds, steps=20, guidance=5.0, eta=1.0)
    rollout.latents       # [B, T+1, C, h, w] fp32: x_T, ..., x_0
    rollout.log_probs     # [B, T] fp32: log pi(x_{t-1} | x_t, c), a MEAN over latent dimensions
    rollout.images        # [B, 3, H, W] fp32 in [0, 1]: x_0 decoded by the VAE, ready for a reward
    new = step_log_prob(pipe, rollout, j, steps=20, guidance=5.0, eta=1.0)   # [B], with gradients
    ratio = torch.exp(new - rollout.log_probs[:, j])

The denoising MDP (Pinterest §3 and Appendix A, after DDPO): the state is (c, t, x_t), the action is x_{t-1},
and the policy is DDIM's Gaussian step (DDIM paper, eq. 12 and 16):

    x0_hat  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                 a_t = alphas_cumprod[t] (alpha-bar)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mean    = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps
    x_{t-1} ~ N(mean, sigma_t^2 I)

where eps is the classifier-free-guided noise prediction. The step's log-density is averaged over the latent
dimensions, not summed (DDPO's convention): PPO's clip range of 1e-4 is tuned for that scale, and with a sum
the ratio explodes. All rollout math is fp32, whatever the pipeline's dtype: fp16 latents shift late-step
log-probs by ~1e-3, more than the clip range.

Seeding follows alignloop.generation.generate: image i draws x_T, then each step's noise, from its own CPU
generator seeded with seeds[i], as the diffusers pipeline does with a list of generators. So a rollout's image
equals generate(..., eta=eta)'s for the same seed (fp32 pipelines), and with eta = 0 (log_probs=False) plain DDIM.

PPO's ratio compares the same transition under two policies, so sampling and re-evaluation must use the same
scheduler (class and configuration), steps, eta, guidance and negative embedding. The rollout stores them;
`step_log_prob` takes the trainer's values and raises RolloutMismatchError on any difference. The negative
(empty-prompt) and prompt embeddings are stored and reused, so the text encoder cannot drift between the two.

The adapter in effect is the caller's: both functions run the pipeline's UNet with whatever LoRA adapters are
active. Keep the UNet in eval mode (dropout would make even the unchanged policy disagree with itself).
"""

import dataclasses
import hashlib
import json
import math
from typing import Sequence, Union

import torch

from alignloop.generation import cpu_generators


class RolloutMismatchError(ValueError):
    """A rollout is re-evaluated with another scheduler, steps, eta or guidance than it was sampled with."""


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """What determines the policy's Gaussian at every step, apart from the UNet's weights."""

    scheduler: str  # the scheduler's class name; only DDIMScheduler is implemented
    scheduler_config: str  # sha256 (16 hex) of its configuration: betas, timestep spacing, offset, prediction type
    steps: int  # denoising steps T
    eta: float  # DDIM noise scale: 1 is DDPM-like; > 0 for a density to exist
    guidance: float  # classifier-free guidance scale; <= 1 means no guidance (the pipeline's rule)
    negative_prompt: str = ""  # the prompt whose embedding is the unconditional branch (stored in the rollout)


@dataclasses.dataclass
class Rollout:
    prompts: list[str]  # B
    seeds: list[int]  # B, one CPU generator each
    latents: torch.Tensor  # [B, T+1, C, h, w] fp32 CPU: step j maps latents[:, j] to latents[:, j+1]
    log_probs: torch.Tensor | None  # [B, T] fp32 CPU: log pi(latents[:, j+1] | latents[:, j]); or None
    timesteps: torch.Tensor  # [T] int64 CPU: the timestep of each step
    prompt_embeds: torch.Tensor  # [B, L, D] fp32 CPU
    negative_embeds: torch.Tensor  # [B, L, D] fp32 CPU: the empty prompt's embedding, one row per sample
    images: torch.Tensor  # [B, 3, H, W] fp32 CPU in [0, 1]: latents[:, -1] decoded
    settings: RolloutSettings

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: Union[Sequence[int], torch.Tensor]) -> "Rollout":
        """The samples at `index` (a minibatch), sharing the settings."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Rollout([self.prompts[i] for i in index.tolist()], [self.seeds[i] for i in index.tolist()],
                       self.latents[index], None if self.log_probs is None else self.log_probs[index],
                       self.timesteps, self.prompt_embeds[index], self.negative_embeds[index], self.images[index],
                       self.settings)


# ---------------------------------------------------------------------------------------------------------
# The settings, and the checks that sampling and training agree
# ---------------------------------------------------------------------------------------------------------

def rollout_settings(pipe, steps: int, guidance: float, eta: float) -> RolloutSettings:
    """The settings a rollout of `pipe` with these values has (or must have, to be re-evaluated with them)."""
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return RolloutSettings(type(pipe.scheduler).__name__, digest, int(steps), float(eta), float(guidance))


def check_same_settings(sampled: RolloutSettings, now: RolloutSettings) -> None:
    """Raises RolloutMismatchError naming every field that differs."""
    differences = [f"{field.name}: sampled with {getattr(sampled, field.name)!r}, "
                   f"re-evaluated with {getattr(now, field.name)!r}"
                   for field in dataclasses.fields(RolloutSettings)
                   if getattr(sampled, field.name) != getattr(now, field.name)]
    if differences:
        raise RolloutMismatchError(
            "a rollout must be re-evaluated with the scheduler, steps, eta and guidance it was sampled with "
            "(PPO's ratio compares the same transition under two policies); " + "; ".join(differences))


def ddim_scheduler(pipe, steps: int):
    """A fresh copy of the pipeline's DDIM scheduler with its timesteps set (the pipeline's own keeps its state)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise ValueError(f"rollouts implement DDIM's step, but the pipeline's scheduler is "
                         f"{type(pipe.scheduler).__name__}; load the pipeline with "
                         f"DDIMScheduler.from_config(pipe.scheduler.config)")
    if pipe.scheduler.config.thresholding:
        raise ValueError("rollouts do not implement the scheduler's dynamic thresholding (thresholding=True); "
                         "use a scheduler configuration with thresholding=False")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def _alphas(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha-bar at t, alpha-bar at the previous step) for each timestep, fp32, shaped [N, 1, 1, 1]."""
    previous = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = scheduler.alphas_cumprod[timesteps]
    # Past the first training timestep DDIM steps to final_alpha_cumprod (alpha-bar_0, or 1 with set_alpha_to_one).
    alpha_prev = torch.where(previous >= 0, scheduler.alphas_cumprod[previous.clamp(min=0)],
                             scheduler.final_alpha_cumprod)
    return alpha_t.float().view(-1, 1, 1, 1), alpha_prev.float().view(-1, 1, 1, 1)


def _sigma(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's sigma_t (eq. 16), in the same operation order as diffusers' DDIMScheduler."""
    variance = ((1 - alpha_prev) / (1 - alpha_t)) * (1 - alpha_t / alpha_prev)
    return eta * variance ** 0.5


def check_noisy_schedule(scheduler, eta: float) -> None:
    """sigma_t > 0 at every step, else a step has no density and its log-probability is undefined."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a rollout with log-probabilities, got eta={eta}: with eta = 0 DDIM "
                         "is deterministic (sigma_t = 0) and a step has no density")
    timesteps = scheduler.timesteps.cpu().long()
    sigma = _sigma(*_alphas(scheduler, timesteps), eta).flatten()
    for j, (t, s) in enumerate(zip(timesteps.tolist(), sigma.tolist())):
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(
                f"sigma_t = {s} at step {j} (timestep {t}) of {len(timesteps)}: every trained step needs sigma_t > 0. "
                f"With set_alpha_to_one={scheduler.config.set_alpha_to_one} the last step goes to alpha-bar "
                f"{float(scheduler.final_alpha_cumprod):.6g}; use set_alpha_to_one=False (Stable Diffusion's own).")


# ---------------------------------------------------------------------------------------------------------
# One step of the policy
# ---------------------------------------------------------------------------------------------------------

def predict_noise(unet, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                  negative_embeds: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided noise prediction eps [B, C, h, w] fp32 for latents [B, C, h, w] at timesteps [B]."""
    dtype = unet.dtype
    if guidance <= 1.0:  # the pipeline's rule: guidance only above 1
        return unet(latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds.to(dtype)).sample.float()
    # Both branches in one UNet pass, unconditional first, as the pipeline batches them.
    eps = unet(torch.cat([latents, latents]).to(dtype), torch.cat([timesteps, timesteps]),
               encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]).to(dtype)).sample.float()
    eps_uncond, eps_text = eps.chunk(2)
    return eps_uncond + guidance * (eps_text - eps_uncond)


def predicted_x0(scheduler, model_output: torch.Tensor, latents: torch.Tensor,
                 alpha_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from the UNet's output at x_t (ᾱ_t: `alpha_t`, broadcastable), as the scheduler's prediction_type
    says (epsilon, v_prediction or sample), x̂0 clipped when the scheduler clips."""
    beta_t = 1 - alpha_t
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        x0, eps_hat = (latents - beta_t ** 0.5 * model_output) / alpha_t ** 0.5, model_output
    elif prediction == "v_prediction":
        x0 = alpha_t ** 0.5 * latents - beta_t ** 0.5 * model_output
        eps_hat = alpha_t ** 0.5 * model_output + beta_t ** 0.5 * latents
    elif prediction == "sample":
        x0, eps_hat = model_output, (latents - alpha_t ** 0.5 * model_output) / beta_t ** 0.5
    else:
        raise ValueError(f"unknown prediction_type {prediction!r} in the scheduler's configuration")
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0, eps_hat


def ddim_mean_std(scheduler, eps: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's Gaussian for x_{t-1}: (mean [B, C, h, w], std [B, 1, 1, 1]), fp32."""
    alpha_t, alpha_prev = (a.to(latents.device) for a in _alphas(scheduler, timesteps.cpu().long()))
    # 1. x0_hat and eps from the model output, as the scheduler reads it
    x0, eps_hat = predicted_x0(scheduler, eps, latents, alpha_t)
    # 2. sigma_t, the direction pointing to x_t, and the mean (DDIM eq. 12)
    std = _sigma(alpha_t, alpha_prev, eta)
    direction = (1 - alpha_prev - std ** 2) ** 0.5 * eps_hat
    mean = alpha_prev ** 0.5 * x0 + direction
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample [B]: the per-dimension log-density MEANED over all dims but the first."""
    log_density = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, x.dim())))


def decode_images(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Final latents [B, C, h, w] -> images [B, 3, H, W] fp32 CPU in [0, 1], as the pipeline decodes them."""
    vae = pipe.vae
    images = vae.decode(latents.to(pipe.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pt").float().cpu()


# ---------------------------------------------------------------------------------------------------------
# Sampling and re-evaluation
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()  # not inference_mode: the stored embeddings feed autograd when the rollout is re-evaluated
def sample_with_logprob(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                        eta: float = 1.0, log_probs: bool = True) -> Rollout:
    """A rollout of `pipe` (its active adapter) for prompts[i] from seeds[i]. With log_probs=False eta may be 0
    (a deterministic DDIM trajectory, nothing to train on)."""
    # 1. Check inputs and the schedule
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"prompts and seeds must be non-empty and of the same length (one seed per image), "
                         f"got {len(prompts)} prompts and {len(seeds)} seeds")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    scheduler = ddim_scheduler(pipe, steps)
    if log_probs:
        check_noisy_schedule(scheduler, eta)
    device, batch = pipe.device, len(prompts)
    timesteps = scheduler.timesteps.cpu().long()  # [T]

    # 2. Encode the prompts and the empty negative prompt (the pipeline's own encoding)
    prompt_embeds, negative_embeds = pipe.encode_prompt(prompts, device, 1, True)
    prompt_embeds, negative_embeds = prompt_embeds.float(), negative_embeds.float()  # [B, L, D]

    # 3. x_T from each image's own CPU generator, drawn on the CPU as the pipeline draws it
    generators = cpu_generators(seeds)
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    latents = torch.cat([torch.randn((1, channels, size, size), generator=g) for g in generators]).to(device)
    latents = latents * scheduler.init_noise_sigma  # [B, C, h, w] fp32
    trajectory = [latents.cpu()]
    step_log_probs = []

    # 4. Denoising loop: x_t -> x_{t-1} ~ N(mean, sigma_t^2 I), recording x_{t-1} and its log-probability
    for t in timesteps:
        t_batch = t.repeat(batch).to(device)  # [B]
        eps = predict_noise(pipe.unet, latents, t_batch, prompt_embeds, negative_embeds, guidance)
        mean, std = ddim_mean_std(scheduler, eps, latents, t_batch, eta)
        if eta > 0:
            noise = torch.cat([torch.randn((1, channels, size, size), generator=g) for g in generators]).to(device)
            previous = mean + std * noise
        else:
            previous = mean
        if log_probs:
            step_log_probs.append(gaussian_log_prob(previous, mean, std).cpu())  # [B]
        latents = previous
        trajectory.append(latents.cpu())

    # 5. Decode x_0 for the rewards
    return Rollout(prompts, seeds, torch.stack(trajectory, dim=1),
                   torch.stack(step_log_probs, dim=1) if log_probs else None, timesteps,
                   prompt_embeds.cpu(), negative_embeds.cpu(), decode_images(pipe, latents),
                   rollout_settings(pipe, steps, guidance, eta))


def step_log_prob(pipe, rollout: Rollout, step_index: Union[int, torch.Tensor], *, steps: int, guidance: float,
                  eta: float) -> torch.Tensor:
    """log pi(x_{t-1} | x_t, c) [B] of the rollout's stored transitions under the pipeline's UNet as it is now,
    with gradients. step_index: one step for every sample, or a LongTensor [B] of one step per sample.
    steps, guidance and eta are the trainer's: they must be the rollout's (RolloutMismatchError otherwise)."""
    # 1. The same sampler as the rollout's, or stop
    check_same_settings(rollout.settings, rollout_settings(pipe, steps, guidance, eta))
    scheduler = ddim_scheduler(pipe, steps)
    check_noisy_schedule(scheduler, eta)
    assert torch.equal(scheduler.timesteps.cpu().long(), rollout.timesteps), "same settings, other timesteps"

    # 2. The stored transitions x_t -> x_{t-1}
    device, batch = pipe.device, len(rollout)
    index = torch.as_tensor(step_index, dtype=torch.long).expand(batch)  # [B]
    rows = torch.arange(batch)
    latents = rollout.latents[rows, index].to(device)  # [B, C, h, w] x_t
    previous = rollout.latents[rows, index + 1].to(device)  # [B, C, h, w] x_{t-1}
    timesteps = rollout.timesteps[index].to(device)  # [B]

    # 3. Their density under the current policy
    eps = predict_noise(pipe.unet, latents, timesteps, rollout.prompt_embeds.to(device),
                        rollout.negative_embeds.to(device), guidance)
    mean, std = ddim_mean_std(scheduler, eps, latents, timesteps, eta)
    return gaussian_log_prob(previous, mean, std)
