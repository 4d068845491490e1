"""Why reward-weighted likelihood makes the shapes-world generator worse, and what limits PPO: controls beside
`bench finetune`'s RWR and PPO rows.

Same data and evaluation as `alignloop bench finetune` (8 base samples of each seen prompt, 3,000 rater votes at
flip 0.1; unseen prompts, 4 seeded images each, 548 images, the same seeds for every row), each row a LoRA from the
base with RwrConfig's (or PpoConfig's) defaults except what its name says:

    renders_only       the β pre-training term alone (no model samples): does LoRA training itself hurt?
    rwr_pw0            the sample term alone (β = 0)
    rwr_tmin500        samples trained only at t >= 500, where the layout (and the count) is decided
    rwr_roundtrip      sample latents re-encoded from the decoded images (posterior samples, as the base was trained)
    rwr_uniform        every sample weight 1: the model's own samples with no reward at all
    rwr_oracle         noise-free votes (the oracle's verdicts): the best reward the sample term could have
    ppo_oracle         PPO (its defaults) with the oracle as the reward: is PPO's limit its reward or its recipe?
    ppo_oracle_lr1e3   the same at lr 1e-3 (its default 3e-4): does PPO move further with larger steps?
    ppo_oracle_pw01    the same with β = 0.1 (its default 0.5): a larger share of each Adam step for the policy
    rwr_eta1           RWR on base samples drawn with DDIM η = 1 (rated by the rater the same way): does fitting the
                       deterministic sampler's outputs cause the drift?
    refl_clip          ReFL (its defaults) on the CLIP score (α = clip_reward_weight, 3): what serving ranks by while
                       the learned head loses to it
    refl_clip_half     the same with the step drawn from the last half of the trajectory (default: last quarter):
                       the layout, and so the count, is decided early, where the last quarter's gradient cannot reach
    refl_clip_3q       the step from the last three quarters
    refl_clip_all      the step from anywhere in the trajectory (x̂0 predicted from as early as pure noise)

Unvoted samples weigh 0 here (the bench gives them the learned reward; 344 of 3,344). About 50 minutes on 2 cores
for the first eight rows, 15 more for each PPO variant:

    python scripts/rwr_drift_probe.py OUT [row,row,...] [split:eta,...]     # rows.jsonl and probe.json in OUT

Every row is evaluated on unseen prompts with deterministic DDIM (unseen:0, what serving draws); the third argument
adds evaluations, e.g. `unseen:1,seen:0,seen:1`: PPO's policy is the η = 1 sampler it was trained with, and its
rollouts are of seen prompts, so these tell a gain that stays with that sampler or those prompts from one that
carries over to serving's. Seen prompts are evaluated at 2 images each (836 images).
"""

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alignloop.machine import describe_machine
from alignloop.models import load_clip, load_generator
from alignloop.rewards import get_reward
from alignloop.settings import home
from alignloop.trainer.config import PpoConfig, ReflConfig, RwrConfig
from alignloop.trainer.finetune import LoraRun
from alignloop.trainer.finetune_bench import ASPECTS
from alignloop.trainer.finetune_data import draw_samples, rater_votes, seen_prompts
from alignloop.trainer.finetune_eval import evaluate_adapter
from alignloop.trainer.ppo import default_rewards, train_ppo
from alignloop.trainer.refl import DifferentiableReward, train_refl
from alignloop.trainer.rwr import sample_weights, train_rwr
from alignloop.world.train import to_tensor

ROWS = ("base", "renders_only", "rwr_pw0", "rwr_tmin500", "rwr_roundtrip", "rwr_uniform", "rwr_oracle", "ppo_oracle",
        "ppo_oracle_lr1e3", "ppo_oracle_pw01", "rwr_eta1", "refl_clip", "refl_clip_half", "refl_clip_3q", "refl_clip_all")


def renders_only(config, folder):
    run = LoraRun(config, folder, progress=False)
    for _ in run.steps():
        loss = run.pretraining_loss()
        run.update(loss, {"pretrain_loss": loss.item()})
    return run


def oracle_ppo(config, folder):
    return train_ppo(config, seen_prompts(), default_rewards(get_reward("oracle"), config), folder, False)


def reencoded(pipe, samples):
    """The samples with latents drawn from the VAE posterior of their decoded images."""
    vae, latents = pipe.vae, []
    with torch.no_grad():
        for i in range(0, len(samples), 64):
            posterior = vae.encode(to_tensor(samples.images[i:i + 64])).latent_dist
            latents.append(posterior.sample() * vae.config.scaling_factor)
    return dataclasses.replace(samples, latents=torch.cat(latents).numpy())


def main(out: Path, rows, evaluations) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pipe = load_generator(device="cpu", dtype=torch.float32)
    clip = load_clip(device="cpu")

    @functools.cache  # only the RWR rows need the base samples (minutes to draw)
    def samples(eta=0.0):
        return draw_samples(pipe, seen_prompts(), 8, 20, 5.0, 0, cache_dir=home() / "cache" / "finetune",
                            progress=False, eta=eta)

    def weights(eta=0.0):
        return sample_weights(rater_votes(samples(eta), flip=0.1, seed=0, count=3000), None, RwrConfig())

    ppo = PpoConfig(seed=0)
    train = {
        "renders_only": lambda f: renders_only(RwrConfig(seed=0), f),
        "rwr_pw0": lambda f: train_rwr(RwrConfig(seed=0, pretrain_weight=0.0), samples(), weights(), f, False),
        "rwr_tmin500": lambda f: train_rwr(RwrConfig(seed=0, sample_min_timestep=500), samples(), weights(), f, False),
        "rwr_roundtrip": lambda f: train_rwr(RwrConfig(seed=0), reencoded(pipe, samples()), weights(), f, False),
        "rwr_uniform": lambda f: train_rwr(RwrConfig(seed=0), samples(), np.ones(len(samples())), f, False),
        "rwr_oracle": lambda f: train_rwr(RwrConfig(seed=0), samples(),
                                          sample_weights(np.where(samples().passed, 1, -1), None, RwrConfig()), f,
                                          False),
        "ppo_oracle": lambda f: oracle_ppo(ppo, f),
        "ppo_oracle_lr1e3": lambda f: oracle_ppo(dataclasses.replace(ppo, lr=1e-3), f),
        "ppo_oracle_pw01": lambda f: oracle_ppo(dataclasses.replace(ppo, pretrain_weight=0.1), f),
        "rwr_eta1": lambda f: train_rwr(RwrConfig(seed=0), samples(1.0), weights(1.0), f, False),
        "refl_clip": lambda f: train_refl(ReflConfig(seed=0), seen_prompts(), DifferentiableReward(clip), f, False),
        **{name: functools.partial(lambda fraction, f: train_refl(ReflConfig(seed=0, last_fraction=fraction),
                                                                  seen_prompts(), DifferentiableReward(clip), f,
                                                                  False), fraction)
           for name, fraction in (("refl_clip_half", 0.5), ("refl_clip_3q", 0.75), ("refl_clip_all", 1.0))},
    }
    for name in rows:
        t0 = time.monotonic()
        the_pipe = pipe if name == "base" else train[name](out / name).pipe
        t1 = time.monotonic()
        for split_name, eta in evaluations:
            result = evaluate_adapter(the_pipe, clip, split_name, per_prompt=4 if split_name == "unseen" else 2,
                                      seed=0, progress=False, eta=eta)
            row = {"name": name, "split": split_name, "eta": eta, "overall": result["overall"],
                   **{a: result["aspects"].get(a) for a in ASPECTS},
                   "fd": result["fidelity_fd"], "div": result["diversity"], "train_s": round(t1 - t0, 1),
                   "date": time.strftime("%Y-%m-%d")}
            print(json.dumps(row), flush=True)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    rows_done = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    (out / "probe.json").write_text(json.dumps({"probe": "rwr_drift", "machine": describe_machine(),
                                                "rows": rows_done}, indent=1))


def parse_evaluations(text: str) -> list:
    """"unseen:1,seen:0" -> [("unseen", 0.0), ("unseen", 1.0), ("seen", 0.0)]: unseen:0 always comes first."""
    cells = [("unseen", 0.0)]
    for cell in filter(None, text.split(",")):
        split_name, _, eta = cell.partition(":")
        try:
            parsed = (split_name, float(eta))
        except ValueError:
            parsed = None
        if split_name not in ("seen", "unseen") or parsed is None or parsed[1] < 0:
            sys.exit(f"evaluations are split:eta with split seen or unseen and eta >= 0, got {cell!r}")
        if parsed not in cells:
            cells.append(parsed)
    return cells


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3, 4):
        sys.exit(__doc__)
    chosen = sys.argv[2].split(",") if len(sys.argv) >= 3 else ROWS
    unknown = sorted(set(chosen) - set(ROWS))
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    main(Path(sys.argv[1]), chosen, parse_evaluations(sys.argv[3] if len(sys.argv) == 4 else ""))
