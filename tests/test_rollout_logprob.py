"""Log-prob correctness of PPO's rollout sampler (issue 15's must-show), on the bundled tiny pipeline.

The unchanged policy re-evaluates its own transitions to |log-ratio| < 1e-5 in fp32; the per-step log-density is
torch.distributions.Normal's, averaged over latent dimensions; sigma_t > 0 at every trained step; another
guidance, steps, eta or scheduler at re-evaluation is an error; a LoRA-perturbed UNet moves the log-probs (so
the first check could fail).
"""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from peft import LoraConfig

from alignloop.generation import generate
from alignloop.models import load_generator
from alignloop.trainer.rollout import (RolloutMismatchError, check_noisy_schedule, ddim_mean_std, gaussian_log_prob,
                                       predict_noise, sample_with_logprob, step_log_prob)

PROMPTS = ["three red circles on a gray background", "a blue square", "two green triangles on a white background"]
SEEDS = [11, 22, 33]
STEPS, GUIDANCE, ETA = 10, 5.0, 1.0
SETTINGS = dict(steps=STEPS, guidance=GUIDANCE, eta=ETA)


@pytest.fixture(scope="module")
def pipe():
    return load_generator(device="cpu")  # fp32 on CPU


@pytest.fixture(scope="module")
def rollout(pipe):
    return sample_with_logprob(pipe, PROMPTS, SEEDS, STEPS, GUIDANCE, eta=ETA)


def test_rollout_records_every_step_in_fp32(rollout):
    batch, channels, size = len(PROMPTS), 4, 16
    assert rollout.latents.shape == (batch, STEPS + 1, channels, size, size) and rollout.latents.dtype == torch.float32
    assert rollout.log_probs.shape == (batch, STEPS) and rollout.log_probs.dtype == torch.float32
    assert rollout.timesteps.shape == (STEPS,) and rollout.timesteps[0] > rollout.timesteps[-1]
    assert rollout.images.shape == (batch, 3, 32, 32) and 0 <= rollout.images.min() and rollout.images.max() <= 1
    assert torch.isfinite(rollout.log_probs).all()
    assert (rollout.settings.steps, rollout.settings.guidance, rollout.settings.eta) == (STEPS, GUIDANCE, ETA)


def test_unchanged_policy_gives_log_ratio_below_1e_5(pipe, rollout):
    with torch.no_grad():
        for j in range(STEPS):
            ratio = step_log_prob(pipe, rollout, j, **SETTINGS) - rollout.log_probs[:, j]
            assert ratio.abs().max() < 1e-5, (j, ratio)


def test_unchanged_policy_on_a_minibatch_with_one_step_per_sample(pipe, rollout):
    # What PPO does: a subset of the samples, each at its own (shuffled) step, in one UNet pass.
    minibatch = rollout.subset([2, 0])
    order = torch.stack([torch.randperm(STEPS, generator=torch.Generator().manual_seed(i)) for i in range(2)])  # [2, T]
    with torch.no_grad():
        for k in range(STEPS):
            steps = order[:, k]
            ratio = step_log_prob(pipe, minibatch, steps, **SETTINGS) - minibatch.log_probs[torch.arange(2), steps]
            assert ratio.abs().max() < 1e-5, (k, ratio)


def test_log_density_is_torch_normal_meaned_over_dimensions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 4, 16, 16, generator=g)
    std = torch.rand(4, 1, 1, 1, generator=g) * 0.5 + 0.01
    x = mean + std * torch.randn(4, 4, 16, 16, generator=g)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected, rtol=1e-5, atol=1e-5)


def test_stored_log_probs_are_torch_normal_of_the_policys_step(pipe, rollout):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    for j in (0, STEPS // 2, STEPS - 1):
        latents, previous = rollout.latents[:, j], rollout.latents[:, j + 1]
        timesteps = rollout.timesteps[j].repeat(len(rollout))
        with torch.no_grad():
            eps = predict_noise(pipe.unet, latents, timesteps, rollout.prompt_embeds, rollout.negative_embeds, GUIDANCE)
        mean, std = ddim_mean_std(scheduler, eps, latents, timesteps, ETA)
        expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(previous).mean(dim=(1, 2, 3))
        torch.testing.assert_close(rollout.log_probs[:, j], expected, rtol=1e-5, atol=1e-5)


def test_step_matches_diffusers_ddim_step(pipe, rollout):
    # Our mean and sigma are DDIMScheduler.step's: its x_{t-1} for the same eps and noise is mean + sigma * noise.
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(1)
    for j in (0, STEPS - 1):
        latents, t = rollout.latents[:, j], rollout.timesteps[j]
        eps, noise = torch.randn(latents.shape, generator=g), torch.randn(latents.shape, generator=g)
        mean, std = ddim_mean_std(scheduler, eps, latents, t.repeat(len(rollout)), ETA)
        theirs = scheduler.step(eps, t, latents, eta=ETA, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean + std * noise, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_is_diffusers_for_every_prediction_type(pipe, rollout, prediction_type):
    """ReFL scores the decoded x̂0: it must read the UNet's output as the scheduler does (it assumed epsilon)."""
    from alignloop.trainer.rollout import predicted_x0

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    scheduler.set_timesteps(STEPS)
    latents, t = rollout.latents[:, 3], rollout.timesteps[3]
    output = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    x0, _ = predicted_x0(scheduler, output, latents, scheduler.alphas_cumprod[t])
    torch.testing.assert_close(x0, scheduler.step(output, t, latents, eta=ETA).pred_original_sample, rtol=0, atol=1e-5)


def test_log_probs_are_a_mean_over_dimensions_not_a_sum(rollout):
    # Per dimension the log-density is O(1) (about -log sigma_t); a sum over the 1024 latent dims would be
    # ~1000x larger and PPO's 1e-4 clip range would clip everything.
    assert rollout.log_probs.abs().max() < 10
    summed = rollout.log_probs[:, -1] * rollout.latents[0, 0].numel()  # what a sum over dims would have given
    assert summed.abs().min() > 100
    # The last step's sigma is small (~0.02): per dimension about -log(0.02) - 0.92 - 0.5 = +2.5
    assert 1.5 < rollout.log_probs[:, -1].mean() < 3.5


def test_sigma_is_positive_at_every_trained_step(pipe):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    check_noisy_schedule(scheduler, ETA)  # the bundled configuration: set_alpha_to_one=False
    _, std = ddim_mean_std(scheduler, torch.zeros(STEPS, 4, 16, 16), torch.zeros(STEPS, 4, 16, 16),
                           scheduler.timesteps, ETA)
    assert (std > 0).all()
    # A configuration whose last step has sigma_t = 0 (set_alpha_to_one=True: alpha-bar_prev = 1) is refused.
    degenerate = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    degenerate.set_timesteps(STEPS)
    with pytest.raises(ValueError, match=r"sigma_t = 0.0 at step 9 .*set_alpha_to_one=False"):
        check_noisy_schedule(degenerate, ETA)


def test_eta_zero_is_refused_with_log_probs(pipe):
    with pytest.raises(ValueError, match="eta must be > 0 for a rollout with log-probabilities, got eta=0.0"):
        sample_with_logprob(pipe, PROMPTS[:1], SEEDS[:1], STEPS, GUIDANCE, eta=0.0)


def test_eta_zero_rollout_image_equals_generate(pipe):
    rollout = sample_with_logprob(pipe, PROMPTS, SEEDS, STEPS, GUIDANCE, eta=0.0, log_probs=False)
    images = generate(pipe, PROMPTS, SEEDS, STEPS, GUIDANCE)
    assert rollout.log_probs is None
    assert (rollout.images - images).abs().max() <= 1 / 255


def test_eta_one_rollout_draws_its_noise_from_the_same_per_image_generators_as_generate(pipe, rollout):
    images = generate(pipe, PROMPTS, SEEDS, STEPS, GUIDANCE, eta=ETA)
    assert (rollout.images - images).abs().max() <= 1 / 255
    channels, size = 4, 16
    for i, seed in enumerate(SEEDS):  # x_T is torch.randn from the image's own CPU generator
        expected = torch.randn((1, channels, size, size), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(rollout.latents[i:i + 1, 0], expected)
    alone = sample_with_logprob(pipe, PROMPTS[1:2], SEEDS[1:2], STEPS, GUIDANCE, eta=ETA)
    torch.testing.assert_close(alone.latents[0], rollout.latents[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("changed, field", [(dict(guidance=7.5), "guidance"), (dict(steps=20), "steps"),
                                            (dict(eta=0.5), "eta")])
def test_changed_setting_at_re_evaluation_raises(pipe, rollout, changed, field):
    with pytest.raises(RolloutMismatchError, match=rf"{field}: sampled with .* re-evaluated with"):
        step_log_prob(pipe, rollout, 0, **{**SETTINGS, **changed})


def test_changed_scheduler_at_re_evaluation_raises(pipe, rollout):
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
        with pytest.raises(RolloutMismatchError, match="scheduler_config: sampled with"):
            step_log_prob(pipe, rollout, 0, **SETTINGS)
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        with pytest.raises(RolloutMismatchError, match="scheduler: sampled with 'DDIMScheduler', re-evaluated with "
                                                       "'EulerDiscreteScheduler'"):
            step_log_prob(pipe, rollout, 0, **SETTINGS)
        with pytest.raises(ValueError, match="rollouts implement DDIM's step"):
            sample_with_logprob(pipe, PROMPTS[:1], SEEDS[:1], STEPS, GUIDANCE)
    finally:
        pipe.scheduler = original


def test_lora_perturbed_unet_moves_the_log_probs_and_gets_gradients(rollout):
    pipe = load_generator(device="cpu")  # its own copy: the adapter must not leak into the other tests
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))  # random, non-zero A and B
    j = STEPS // 2
    log_prob = step_log_prob(pipe, rollout, j, **SETTINGS)
    ratio = (log_prob - rollout.log_probs[:, j]).detach()
    assert ratio.abs().min() > 1e-3, ratio  # far outside the 1e-5 of the unchanged policy
    log_prob.mean().backward()  # the stored embeddings and latents can feed autograd
    lora_grads = [p.grad for name, p in pipe.unet.named_parameters() if "lora" in name]
    assert lora_grads and all(g is not None for g in lora_grads) and sum(g.abs().sum() for g in lora_grads) > 0
    pipe.unet.disable_adapters()  # the base policy again: its own transitions, ratio 1
    with torch.no_grad():
        assert (step_log_prob(pipe, rollout, j, **SETTINGS) - rollout.log_probs[:, j]).abs().max() < 1e-5


def test_bf16_pipeline_still_keeps_rollout_math_in_fp32():
    pipe = load_generator(device="cpu", dtype="bf16")
    rollout = sample_with_logprob(pipe, PROMPTS[:2], SEEDS[:2], 4, GUIDANCE)
    assert rollout.latents.dtype == rollout.log_probs.dtype == rollout.prompt_embeds.dtype == torch.float32
    assert torch.isfinite(rollout.log_probs).all()
    with torch.no_grad():
        ratio = step_log_prob(pipe, rollout, 3, steps=4, guidance=GUIDANCE, eta=ETA) - rollout.log_probs[:, 3]
    assert ratio.abs().max() < 1e-5


def test_bad_input_is_named(pipe):
    with pytest.raises(ValueError, match="one seed per image"):
        sample_with_logprob(pipe, PROMPTS, SEEDS[:2], STEPS, GUIDANCE)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample_with_logprob(pipe, PROMPTS, SEEDS, STEPS, GUIDANCE, eta=-1.0, log_probs=False)
