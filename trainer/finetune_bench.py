"""`alignloop bench finetune`: the four fine-tuning methods side by side, from the same votes, on unseen prompts.

In the shapes world, with the bundled generator and CLIP, in one run:

    1. Data       8 base samples of every seen prompt (20 DDIM steps, guidance 5, world eval's seeds), ~3,000 of
                  them voted by the simulated rater (flip 0.1); a reward head trained on those votes (the
                  learned reward: RWR's reward where there is no vote, PPO's and ReFL's reward)
    2. Train      RWR, PPO, ReFL and Diffusion-KTO, each a LoRA from the base with its config's defaults; and
                  the row that explains the first failed recipe: RWR fitting the conditional branch alone to
                  the guided samples (`rwr_conditional`, see alignloop.trainer.finetune)
    3. Evaluate   the base and every adapter on unseen prompts (4 seeded images per prompt, the same seeds for
                  all): oracle pass rate overall and per aspect, the fidelity proxy (Fréchet distance of CLIP
                  embeddings against renders of the same prompts), diversity; and a grid base vs each adapter

The last line is one JSON object; `ratio` is the best method's unseen pass rate over the base's.
"""

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from alignloop.trainer.finetune_job import METHODS

ASPECTS = ("count", "color", "shape", "background")
FULL = {"train_prompts": None, "per_prompt": 8, "votes": 3000, "eval_prompts": None, "eval_per_prompt": 4, "steps": {}}
# --quick shows that each code path learns something, not how much: few samples, few steps, few eval prompts.
QUICK = {"train_prompts": 48, "per_prompt": 2, "votes": None, "eval_prompts": 8, "eval_per_prompt": 2,
         "steps": {"rwr": 20, "rwr_conditional": 20, "ppo": 4, "refl": 6, "kto": 20}, "batch_size": 8}


def run(out_dir: Path, quick: bool = False, seed: int = 0, methods=METHODS, explain: bool = True,
        progress: bool = True, log=print) -> dict:
    import torch

    from alignloop.machine import describe_machine
    from alignloop.models import load_clip, load_generator
    from alignloop.rewards import get_reward
    from alignloop.trainer.config import KtoConfig, PpoConfig, ReflConfig, RewardTrainConfig, RwrConfig
    from alignloop.trainer.finetune_data import draw_samples, rater_votes, seen_prompts
    from alignloop.trainer.finetune_eval import evaluate_adapter, image_grid
    from alignloop.trainer.finetune_job import train_method
    from alignloop.world.evaluate import draw_split_images
    from alignloop.trainer.reward_model import train_reward_from_arrays
    from alignloop.settings import home

    settings = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = {"benchmark": "finetune", "quick": quick, "seed": seed, "machine": describe_machine(),
              "settings": settings, "unseen": {}, "fidelity": {},
              "diversity": {}, "seconds": {}, "training": {}}

    # 1. Data: base samples of seen prompts, the rater's votes, the learned reward
    pipe = load_generator(device="cpu", dtype=torch.float32)
    clip = load_clip(device="cpu")
    prompts = seen_prompts()
    if settings["train_prompts"]:
        prompts = random.Random(seed).sample(prompts, settings["train_prompts"])
    samples = draw_samples(pipe, prompts, settings["per_prompt"], 20, 5.0, seed,
                           cache_dir=home() / "cache" / "finetune", progress=progress)
    votes = rater_votes(samples, flip=0.1, seed=seed, count=settings["votes"])
    voted = np.flatnonzero(votes != 0)
    log(f"data: {len(samples)} base samples of seen prompts (oracle pass {samples.passed.mean():.3f}), "
        f"{len(voted)} votes ({(votes > 0).sum()} up)")
    trained = train_reward_from_arrays(samples.images[voted], [samples.prompts[i].text for i in voted],
                                       (votes[voted] > 0).astype(int), clip=clip,
                                       config=RewardTrainConfig(hidden=(256, 256), epochs=10 if quick else 40))
    learned = get_reward("learned", head=trained.head, clip=clip)
    learned_scores = learned(samples.images, [p.text for p in samples.prompts])[0].numpy()
    report["reward_model"] = trained.metrics
    report["data"] = {"samples": len(samples), "votes": int(len(voted)), "up_votes": int((votes > 0).sum()),
                      "sample_pass_rate": round(float(samples.passed.mean()), 4)}

    # 2-3. The base, then each method trained from it and evaluated on the same seeds
    def evaluate(name: str, the_pipe) -> None:
        result = evaluate_adapter(the_pipe, clip, "unseen", per_prompt=settings["eval_per_prompt"], seed=seed,
                                  max_prompts=settings["eval_prompts"], progress=progress)
        report["unseen"][name] = {"overall": result["overall"], **{a: result["aspects"].get(a) for a in ASPECTS}}
        report["fidelity"][name], report["diversity"][name] = result["fidelity_fd"], result["diversity"]
        log(f"{name}: unseen pass {result['overall']:.3f} {report['unseen'][name]} fidelity FD "
            f"{result['fidelity_fd']:.4f} diversity {result['diversity']:.4f}")

    evaluate("base", pipe)
    _, _, base_grid = draw_split_images(pipe, "unseen", 6, 20, 5.0, seed, max_prompts=8, progress=False)

    configs = {
        "rwr": RwrConfig(seed=seed), "rwr_conditional": RwrConfig(seed=seed, guided_loss=False),
        "ppo": PpoConfig(seed=seed), "refl": ReflConfig(seed=seed), "kto": KtoConfig(seed=seed)}
    runs = [m for m in methods] + (["rwr_conditional"] if explain and "rwr" in methods else [])
    for name in runs:
        config = configs[name]
        if name in settings["steps"]:
            config = dataclasses.replace(config, steps=settings["steps"][name],
                                         batch_size=settings.get("batch_size", config.batch_size))
        shutil.rmtree(out_dir / name, ignore_errors=True)  # the bench starts each run afresh, never resumes one
        t0 = time.monotonic()
        trained_run = train_method(name, config, samples, votes, learned, learned_scores, clip, trained.head,
                                   out_dir / name, progress)
        report["seconds"][name] = round(time.monotonic() - t0, 1)
        trained_run.finish({"benchmark": "finetune", "seed": seed})  # out_dir/<method>/adapter, for a second look
        report["training"][name] = {"config": config.to_dict(), "last": _last_metrics(out_dir / name)}
        evaluate(name, trained_run.pipe)
        _, _, grid = draw_split_images(trained_run.pipe, "unseen", 6, 20, 5.0, seed, max_prompts=8, progress=False)
        image_grid([row for pair in zip(base_grid.reshape(8, 6, *base_grid.shape[1:]),
                                        grid.reshape(8, 6, *grid.shape[1:])) for row in pair],
                   out_dir / f"grid-base-vs-{name}.png")
        del trained_run

    best = max((m for m in methods if m in report["unseen"]), key=lambda m: report["unseen"][m]["overall"])
    report.update(best=best, ratio=round(report["unseen"][best]["overall"] / max(report["unseen"]["base"]["overall"],
                                                                                  1e-9), 4),
                  ratio_means="the best method's oracle pass rate on unseen prompts over the base generator's",
                  total_seconds=round(time.monotonic() - started, 1))
    (out_dir / "bench-finetune.json").write_text(json.dumps(report, indent=1))
    return report


def _last_metrics(folder: Path) -> Optional[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def summary_lines(report: dict) -> list:
    lines = [f"{'':18s} {'overall':>8s} " + " ".join(f"{a:>10s}" for a in ASPECTS) + f" {'fidelity':>9s} "
             f"{'diversity':>9s} {'seconds':>8s}"]
    for name, row in report["unseen"].items():
        lines.append(f"{name:18s} {row['overall']:8.3f} " + " ".join(
            f"{row[a]:10.3f}" if row[a] is not None else f"{'-':>10s}" for a in ASPECTS)
            + f" {report['fidelity'][name]:9.4f} {report['diversity'][name]:9.4f} "
              f"{report['seconds'].get(name, 0):8.0f}")
    lines.append(f"best: {report['best']}, ratio {report['ratio']} ({report['ratio_means']})")
    return lines
