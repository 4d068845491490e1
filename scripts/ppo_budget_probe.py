"""Is PPO's limit in the shapes world its step budget? PPO (PpoConfig's defaults) with the oracle as its reward, the
best reward it could have, so that only the recipe and its budget are measured.

    overfit   PPO on 8 seen prompts only (the round's 32 rollouts are 4 of each), 120 steps: the oracle pass rate of
              its rollouts round by round, and of those 8 prompts before and after (24 fixed seeds each, DDIM η = 1,
              the policy's sampler, and η = 0, serving's). Can it learn even the prompts it trains on?
    steps     PPO on every seen prompt, the unseen pass rate (the 548 images of `bench finetune` and the drift probe,
              η = 0) after 120 (the default), 240 and 360 steps: one run, resumed from its checkpoint at each mark.
              Does it go on climbing where the default stops?

    python scripts/ppo_budget_probe.py OUT [overfit|steps ...]      # rows.jsonl and probe.json in OUT

About 10 minutes for `overfit`, 45 for `steps` on 2 cores.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alignloop.generation import generate
from alignloop.machine import describe_machine
from alignloop.models import load_clip, load_generator
from alignloop.rewards import get_reward
from alignloop.trainer.config import PpoConfig
from alignloop.trainer.finetune_data import seen_prompts
from alignloop.trainer.finetune_eval import evaluate_adapter
from alignloop.trainer.ppo import default_rewards, train_ppo

PARTS = ("overfit", "steps")
STEP_MARKS = (120, 240, 360)
OVERFIT_SEEDS = range(10_000, 10_024)


def record(out: Path, row: dict) -> None:
    row = {**row, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row), flush=True)
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def pass_rates(pipe, oracle, prompts, eta: float) -> tuple:
    """(overall, per prompt) oracle pass rate of `prompts`, one image per seed of OVERFIT_SEEDS each."""
    texts = [p.text for p in prompts for _ in OVERFIT_SEEDS]
    seeds = [s for _ in prompts for s in OVERFIT_SEEDS]
    scores = [oracle(generate(pipe, texts[i:i + 48], seeds[i:i + 48], 20, 5.0, output_type="uint8", eta=eta),
                     texts[i:i + 48])[0].numpy() for i in range(0, len(texts), 48)]
    per_prompt = np.concatenate(scores).reshape(len(prompts), len(OVERFIT_SEEDS)).mean(1)
    return round(float(per_prompt.mean()), 4), [round(float(x), 3) for x in per_prompt]


def overfit(out: Path, oracle) -> None:
    prompts = seen_prompts()
    picked = [prompts[i] for i in np.random.default_rng(1).choice(len(prompts), 8, replace=False)]
    base = load_generator(device="cpu", dtype=torch.float32)
    before = {f"eta{eta:g}": pass_rates(base, oracle, picked, eta) for eta in (1.0, 0.0)}
    curve = []

    def logged(images, texts, meta=None):
        scores, info = oracle(images, texts, meta)
        curve.append(round(float(scores.mean()), 4))
        return scores, info

    config = PpoConfig(seed=0)
    t0 = time.monotonic()
    run = train_ppo(config, picked, default_rewards(logged, config), out / "overfit", False)
    train_s = round(time.monotonic() - t0, 1)
    after = {f"eta{eta:g}": pass_rates(run.pipe, oracle, picked, eta) for eta in (1.0, 0.0)}
    tenth = max(1, len(curve) // 10)
    record(out, {"part": "overfit", "prompts": [p.text for p in picked], "steps": config.steps,
                 "before": before, "after": after, "train_s": train_s, "rollout_pass_by_round": curve,
                 "rollout_pass_first_tenth": round(float(np.mean(curve[:tenth])), 4),
                 "rollout_pass_last_tenth": round(float(np.mean(curve[-tenth:])), 4)})


def steps(out: Path, oracle) -> None:
    clip = load_clip(device="cpu")
    config = PpoConfig(seed=0)
    started = time.monotonic()
    for mark in STEP_MARKS:  # the same run each time: it resumes from out/steps/checkpoint.pt
        run = train_ppo(dataclasses.replace(config, steps=mark, checkpoint_every=STEP_MARKS[0]), seen_prompts(),
                        default_rewards(oracle, config), out / "steps", False)
        train_s = round(time.monotonic() - started, 1)
        result = evaluate_adapter(run.pipe, clip, "unseen", per_prompt=4, seed=0, progress=False, eta=0.0)
        record(out, {"part": "steps", "steps": mark, "overall": result["overall"], **result["aspects"],
                     "fd": result["fidelity_fd"], "div": result["diversity"], "train_s": train_s})
        started = time.monotonic()


def main(out: Path, parts) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    oracle = get_reward("oracle")
    for part in parts:
        {"overfit": overfit, "steps": steps}[part](out, oracle)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    (out / "probe.json").write_text(json.dumps({"probe": "ppo_budget", "command": " ".join(sys.argv),
                                                "machine": describe_machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    chosen = sys.argv[2:] or list(PARTS)
    if len(sys.argv) < 2 or set(chosen) - set(PARTS):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), chosen)
