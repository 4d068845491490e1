"""LoRA fine-tuning (issue 15): each method's loss, that each code path learns something in a few steps, the
adapter it writes, resuming, and the errors for bad input. The benchmark (`alignloop bench finetune`) measures how
much they learn; these only show that the signal reaches the weights in the intended direction."""

import json
import random

import numpy as np
import pytest
import torch

from alignloop.trainer.config import KtoConfig, PpoConfig, ReflConfig, RwrConfig
from alignloop.trainer.finetune_data import Samples, check_seen, draw_samples, rater_votes, seen_prompts
from alignloop.trainer.kto import kto_loss, train_kto
from alignloop.trainer.ppo import PerPromptTracker, clipped_surrogate
from alignloop.trainer.rwr import sample_weights, train_rwr
from alignloop.world.grammar import parse_prompt, split
from finetune_fixtures import SMALL_RUN, voted_snapshot

TINY = dict(batch_size=8, pretrain_batch_size=8, checkpoint_every=5)


@pytest.fixture(scope="module")
def samples(pipe):
    """16 base samples of two seen prompts, 4 steps (quick), with the oracle's verdicts."""
    prompts = [parse_prompt("two circles"), parse_prompt("three cyan squares on a gray background")]
    return draw_samples(pipe, prompts, per_prompt=8, steps=4, guidance=5.0, seed=0, progress=False)


def test_the_sample_cache_is_judged_again_on_load_and_a_torn_one_is_drawn_again(pipe, tmp_path):
    """The cache file is named by the generator and the settings, not the oracle: its verdicts are recomputed on
    load (a verdict written by an older oracle is not read back), and a file torn by a crash is drawn again."""
    prompts = [parse_prompt("two circles")]
    first = draw_samples(pipe, prompts, per_prompt=2, steps=2, guidance=5.0, seed=0, cache_dir=tmp_path,
                         progress=False)
    [cache] = tmp_path.glob("samples-*.npz")
    with np.load(cache) as data:
        stale = {name: data[name] for name in data.files}
    np.savez(cache, **stale, passed=~first.passed)  # an older version's file, with what an older oracle said
    again = draw_samples(pipe, prompts, per_prompt=2, steps=2, guidance=5.0, seed=0, cache_dir=tmp_path,
                         progress=False)
    assert np.array_equal(again.passed, first.passed) and np.array_equal(again.images, first.images)
    cache.write_bytes(cache.read_bytes()[:100])  # torn
    redrawn = draw_samples(pipe, prompts, per_prompt=2, steps=2, guidance=5.0, seed=0, cache_dir=tmp_path,
                           progress=False)
    assert np.array_equal(redrawn.images, first.images)
    with np.load(cache) as data:
        assert np.array_equal(data["images"], first.images)


# -- losses -------------------------------------------------------------------------------------------------

def test_kto_loss_rewards_up_votes_denoised_better_and_down_votes_worse():
    config = KtoConfig(beta=100.0)
    up = torch.tensor([True, False])
    base = torch.tensor([1.0, 1.0])
    good = kto_loss(torch.tensor([0.9, 1.1]), base, up, config)[0]  # up denoised better, down worse
    bad = kto_loss(torch.tensor([1.1, 0.9]), base, up, config)[0]
    assert good < bad
    # the reference point is the batch mean of g, clamped at 0 and detached
    policy = torch.tensor([0.5, 0.5], requires_grad=True)
    loss, stats = kto_loss(policy, torch.tensor([1.0, 1.0]), up, config)
    assert stats["reference_point"] == pytest.approx(0.5)
    loss.backward()
    assert policy.grad[0] > 0 or policy.grad[1] < 0  # push the up-vote's error down, the down-vote's up
    _, stats = kto_loss(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), up, config)
    assert stats["reference_point"] == 0.0


def test_clipped_surrogate_clips_the_ratio_at_the_range():
    old = torch.zeros(4)
    new = torch.tensor([0.0, 1e-3, -1e-3, 5e-5])
    advantages = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, stats = clipped_surrogate(new, old, advantages, clip_range=1e-4)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    # max(−A·ρ, −A·clip(ρ)): a positive advantage gains at most 1 + ε; a negative one is charged at least 1 − ε
    expected = [-1.0, -(1 + 1e-4), 1 - 1e-4, -np.exp(5e-5)]
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-6)


def test_per_prompt_tracker_uses_the_batch_until_a_prompt_has_history():
    tracker = PerPromptTracker(buffer=8, min_count=3)
    first = tracker.advantages(["a", "b"], np.array([1.0, 0.0]))
    assert first == pytest.approx([1.0, -1.0], abs=1e-5)  # batch statistics
    tracker.advantages(["a", "a"], np.array([1.0, 1.0]))
    later = tracker.advantages(["a", "b"], np.array([3.0, 0.0]))
    history = np.array([1.0, 1.0, 1.0, 3.0])
    assert later[0] == pytest.approx((3.0 - history.mean()) / (history.std() + 1e-6))


def test_rwr_weights_votes_and_the_learned_reward():
    config = RwrConfig()
    votes = np.array([1, -1, 0, 0])
    weights = sample_weights(votes, np.array([0.0, 0.0, 0.25, 0.9]), config)
    assert weights.tolist() == [1.0, 0.0, 0.25, 0.9]
    with pytest.raises(ValueError, match="no sample has a positive reward"):
        sample_weights(np.array([-1, -1]), None, config)


def test_held_out_prompts_never_enter_the_loop():
    unseen = split("unseen")[0]
    with pytest.raises(ValueError, match="held-out"):
        check_seen([unseen])
    assert not any(p.unseen for p in seen_prompts())


def test_rater_votes_follow_the_oracle_with_the_flip_rate():
    prompts = seen_prompts()[:400]
    fake = Samples(prompts, np.arange(400), np.zeros((400, 1)), np.zeros((400, 1, 1, 3), np.uint8),
                   np.arange(400) % 2 == 0)
    votes = rater_votes(fake, flip=0.1, seed=0)
    agree = ((votes > 0) == fake.passed).mean()
    assert 0.85 < agree < 0.95
    assert (rater_votes(fake, flip=0.1, seed=0, count=100) != 0).sum() == 100


# -- each method learns in the intended direction ------------------------------------------------------------

def _denoising_error(run, samples, rows, guidance, adapter: bool) -> float:
    """Mean guided denoising error over fixed noise and timesteps, with the LoRA on or off."""
    torch.manual_seed(123)
    latents = torch.from_numpy(samples.latents[rows])
    texts = [samples.prompts[i].text for i in rows]
    with torch.no_grad():
        if adapter:
            return run.denoising_loss(latents, texts, guidance).mean().item()
        with run.base():
            return run.denoising_loss(latents, texts, guidance).mean().item()


def test_rwr_fits_the_rewarded_samples(samples, tmp_path):
    config = RwrConfig(steps=15, lr=1e-3, pretrain_weight=0.1, **TINY)
    weights = np.zeros(len(samples))
    weights[:4] = 1.0  # four samples of the first prompt carry the reward
    run = train_rwr(config, samples, weights, tmp_path / "rwr", progress=False)
    rewarded = list(range(4))
    assert _denoising_error(run, samples, rewarded, 5.0, True) < _denoising_error(run, samples, rewarded, 5.0, False)
    folder = run.finish()
    record = json.loads((folder / "adapter.json").read_text())
    assert record["config"]["rank"] == config.rank and record["steps"] == 15


def test_kto_separates_up_from_down_votes(samples, tmp_path):
    votes = np.where(np.arange(len(samples)) % 2 == 0, 1, -1).astype(np.int8)
    config = KtoConfig(steps=15, lr=1e-3, beta=500.0, pretrain_weight=0.0, **TINY)
    run = train_kto(config, samples, votes, tmp_path / "kto", progress=False)
    up, down = np.flatnonzero(votes > 0), np.flatnonzero(votes < 0)
    gain_up = _denoising_error(run, samples, up, 5.0, False) - _denoising_error(run, samples, up, 5.0, True)
    gain_down = _denoising_error(run, samples, down, 5.0, False) - _denoising_error(run, samples, down, 5.0, True)
    assert gain_up > gain_down  # the implicit reward g of up-voted images rose above the down-voted ones'


def test_kto_needs_both_kinds_of_votes(samples, tmp_path):
    with pytest.raises(ValueError, match="up- and down-votes"):
        train_kto(KtoConfig(steps=1, **TINY), samples, np.ones(len(samples), np.int8), tmp_path, progress=False)


def test_ppo_update_raises_the_likelihood_of_high_advantage_steps(tmp_path, monkeypatch):
    """One round in which every other rollout of each prompt is rewarded: after the update their transitions are
    likelier under the policy than before, relative to the others' (the surrogate pushes the right way)."""
    from alignloop.trainer import rollout as rollout_module
    from alignloop.trainer.ppo import train_ppo

    drawn = []
    original = rollout_module.sample_with_logprob
    monkeypatch.setattr(rollout_module, "sample_with_logprob", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    config = PpoConfig(steps=1, minibatches=1, batch_size=8, sample_steps=4, train_timesteps=4, lr=1e-5,
                       clip_range=1.0, pretrain_weight=0.0, checkpoint_every=5)
    rewards = {"test": (1.0, lambda images, texts: (np.arange(len(texts)) % 2).astype(float), lambda p: True)}
    run = train_ppo(config, seen_prompts()[:4], rewards, tmp_path / "ppo", progress=False)
    metrics = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-4)  # the first update sees the sampling policy
    (rollout,) = drawn
    with torch.no_grad():
        log_ratio = torch.stack([rollout_module.step_log_prob(run.pipe, rollout, j, steps=4, guidance=config.guidance,
                                                              eta=1.0) - rollout.log_probs[:, j] for j in range(4)])
    per_rollout = log_ratio.mean(0)
    assert per_rollout[1::2].mean() > per_rollout[0::2].mean()


def test_refl_raises_the_reward_of_the_predicted_image(tmp_path):
    from alignloop.models import load_clip
    from alignloop.rewards.head import RewardHead
    from alignloop.trainer.refl import DifferentiableReward, train_refl

    clip = load_clip(device="cpu")
    torch.manual_seed(0)
    head = RewardHead(embed_dim=clip.embed_dim, hidden=(32, 32))
    config = ReflConfig(steps=12, lr=3e-3, kl_weight=0.0, sample_steps=4, **TINY)
    train_refl(config, seen_prompts()[:4], DifferentiableReward(clip, head), tmp_path / "refl", progress=False)
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "refl" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4])


def test_the_differentiable_reward_without_a_head_is_the_clip_score_serving_ranks_by():
    from alignloop.models import load_clip
    from alignloop.rewards import get_reward
    from alignloop.trainer.refl import DifferentiableReward
    from alignloop.world.render import render_batch

    prompts = seen_prompts()[:6]
    renders, _ = render_batch(prompts, random.Random(0))
    pixels = torch.tensor(renders).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    texts = [p.text for p in prompts]
    scores = DifferentiableReward(load_clip(device="cpu"))(pixels, texts)
    served, _ = get_reward("clip")(renders, texts)
    np.testing.assert_allclose(scores.detach().numpy(), served.numpy(), atol=1e-4)
    scores.sum().backward()
    assert pixels.grad.abs().sum() > 0

# -- the run's bookkeeping ------------------------------------------------------------------------------------

def test_a_run_resumes_where_it_stopped_and_refuses_another_config(samples, tmp_path):
    weights = np.ones(len(samples))
    train_rwr(RwrConfig(steps=2, **{**TINY, "checkpoint_every": 1}), samples, weights, tmp_path / "r", progress=False)
    train_rwr(RwrConfig(steps=3, **{**TINY, "checkpoint_every": 1}), samples, weights, tmp_path / "r", progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    with pytest.raises(ValueError, match="another config"):
        train_rwr(RwrConfig(steps=3, lr=1e-2, **TINY), samples, weights, tmp_path / "r", progress=False)


def test_the_saved_adapter_passes_serving_validation_with_its_metadata(samples, tmp_path):
    from alignloop.adapters import base_model_identity, validate_adapter
    from alignloop.registry import Registry
    from alignloop.rollout import publish_adapter

    run = train_rwr(RwrConfig(steps=1, rank=4, alpha=2.0, **TINY), samples, np.ones(len(samples)), tmp_path / "a",
                    progress=False)
    folder = run.finish()
    record = json.loads((folder / "adapter.json").read_text())
    registry = Registry(tmp_path / "registry")
    manifest = publish_adapter(registry, folder, base=record["base"], config=record["config"], who="test", why="test")
    report = validate_adapter(registry.fetch("adapter", manifest.version), base_model_identity(run.pipe), run.unet,
                              max_rank=8)
    assert (report.rank, report.alpha) == (4, 2.0)
    assert set(report.target_modules) == set(RwrConfig().target_modules)


def test_ppo_refuses_a_sampler_without_noise(tmp_path):
    from alignloop.trainer.ppo import train_ppo

    with pytest.raises(ValueError, match=r"eta|η"):
        train_ppo(PpoConfig(steps=1, eta=0.0, sample_steps=4, **TINY), seen_prompts()[:2],
                  {"t": (1.0, lambda im, pr: np.zeros(len(pr)), lambda p: True)}, tmp_path, progress=False)


def test_refl_refuses_a_trajectory_without_noise():
    with pytest.raises(ValueError, match="eta must be > 0"):  # σ_t = 0: its KL term would be 0/0
        ReflConfig(eta=0.0)


# -- the command: from a snapshot's votes to a candidate adapter -------------------------------------------------

def test_train_kto_from_a_snapshot_publishes_a_candidate_with_its_manifest(pipe, tmp_path, capsys):
    from alignloop.cli import main
    from alignloop.registry import Registry

    snapshot = voted_snapshot(tmp_path / "snap", pipe, ["two circles", "one square"] * 4)
    registry = str(tmp_path / "registry")
    code = main(["train", "kto", "--snapshot", str(snapshot), "--registry", registry, "--out", str(tmp_path / "run"),
                 *SMALL_RUN])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["data"]["redraw"]["redrawn"] == 8, report
    manifest = Registry(registry).get("adapter", report["published"])
    assert manifest.state == "candidate" and manifest.config["method"] == "kto"
    assert manifest.base["unet_sha256"] and manifest.data["snapshot_version"] == "v000001"
    assert manifest.data["offsets"] and manifest.data["world"] and "unseen_pass" in manifest.metrics
    # The same --out resumes: a longer run continues from the saved step instead of starting over.
    longer = ["--steps", "3", *SMALL_RUN[2:]]
    assert main(["train", "kto", "--snapshot", str(snapshot), "--registry", registry, "--out", str(tmp_path / "run"),
                 "--no-publish", *longer]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_votes_on_prompts_naming_held_out_pairs_are_dropped_before_the_redraw_not_refused(pipe, tmp_path):
    # Snapshots are cumulative: refusing them would fail every later nightly fine-tune after one such vote.
    from alignloop.trainer.finetune_job import redraw_voted
    from alignloop.trainer.reward_model import read_snapshot

    folder = voted_snapshot(tmp_path / "snap", pipe, ["two circles", "a red triangle", "one square", "Three circles."])
    rows, version, _ = read_snapshot(folder)
    samples, votes, report = redraw_voted(pipe, rows, version, registry=None, progress=False)
    assert [p.text for p in samples.prompts] == ["two circles", "one square"] and votes.tolist() == [1, 1]
    assert report["held_out_pair_votes"] == 2 and report["voted"] == 4 and report["redrawn"] == 2


@pytest.mark.parametrize("case, message", [
    ("empty", "has no votes"),
    ("redraw differs", "could be redrawn as the users saw them"),
    ("other base", "another base model"),
])
def test_bad_fine_tuning_input_is_a_clear_error_and_publishes_nothing(pipe, tmp_path, capsys, case, message):
    from alignloop.cli import main
    from alignloop.registry import Registry

    registry = Registry(tmp_path / "registry")
    folder = tmp_path / "snap"
    if case == "empty":
        voted_snapshot(folder, pipe, [])
    elif case == "redraw differs":
        voted_snapshot(folder, pipe, ["two circles"] * 4, tamper=True)
    else:  # the votes were drawn by an adapter made for another base model
        run = train_rwr(RwrConfig(steps=1, **TINY), _voted_samples_stub(), np.ones(2), tmp_path / "other",
                        progress=False)
        adapter_folder = run.finish()
        record = json.loads((adapter_folder / "adapter.json").read_text())
        manifest = registry.publish("adapter", {"pytorch_lora_weights.safetensors":
                                                adapter_folder / "pytorch_lora_weights.safetensors"},
                                    base={**record["base"], "unet_sha256": "0" * 64}, who="test", why="other base")
        voted_snapshot(folder, pipe, ["two circles"] * 4, adapter=manifest.version)
    before = len(registry.versions("adapter"))
    code = main(["train", "rwr", "--snapshot", str(folder), "--registry", str(registry.url), *SMALL_RUN])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(registry.versions("adapter")) == before


def _voted_samples_stub():
    prompts = seen_prompts()[:2]
    return Samples(prompts, np.arange(2), np.random.default_rng(0).normal(size=(2, 4, 16, 16)).astype(np.float32),
                   np.zeros((2, 32, 32, 3), np.uint8), np.ones(2, bool))


@pytest.mark.slow
def test_quick_finetune_benchmark_reports_every_method_side_by_side(tmp_path, capsys):
    from alignloop.cli import main

    code = main(["bench", "finetune", "--quick", "--json", "--out", str(tmp_path)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    for key in ("unseen", "fidelity", "diversity", "seconds"):
        assert set(report[key]) >= {"rwr", "ppo", "refl", "kto"}, key
    assert set(report["unseen"]) >= {"base", "rwr_conditional"}
    for row in report["unseen"].values():
        assert set(row) == {"overall", "count", "color", "shape", "background"}
        assert 0 <= row["overall"] <= 1
    assert report["ratio"] > 0 and report["best"] in ("rwr", "ppo", "refl", "kto") and report["machine"]
    for method in ("rwr", "ppo", "refl", "kto"):
        assert (tmp_path / f"grid-base-vs-{method}.png").is_file()
        assert (tmp_path / method / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        assert report["training"][method]["last"]["step"] == report["training"][method]["config"]["steps"]


def test_a_run_goes_on_from_a_published_adapter_with_its_weights_and_refuses_other_settings(samples, tmp_path):
    from alignloop.registry import Registry
    from alignloop.rollout import publish_adapter
    from alignloop.trainer.finetune import LoraRun

    first = train_rwr(RwrConfig(steps=2, lr=1e-2, **TINY), samples, np.ones(len(samples)), tmp_path / "a",
                      progress=False)
    folder = first.finish()
    record = json.loads((folder / "adapter.json").read_text())
    registry = Registry(tmp_path / "registry")
    version = publish_adapter(registry, folder, base=record["base"], config=record["config"], who="t", why="t").version
    fetched = str(registry.fetch("adapter", version))
    trained = {k: v.detach().clone() for k, v in first._lora_state().items()}
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # it learned something to carry over

    second = LoraRun(RwrConfig(steps=1, init_adapter=fetched, **TINY), tmp_path / "b", progress=False)
    carried = second._lora_state()
    assert sorted(carried) == sorted(trained)
    assert all(torch.equal(carried[k].detach(), trained[k]) for k in trained)
    with pytest.raises(ValueError, match="differ from this config"):
        LoraRun(RwrConfig(steps=1, rank=4, init_adapter=fetched, **TINY), tmp_path / "c", progress=False)
