"""Trains variants of the bundled generator's recipe side by side on one GPU and scores each with the oracle.

The recipe is the same code as `alignloop world train-generator` (on CPU the bundled model takes about an
hour), so a GPU sweep ranks recipes and the CPU run then trains the winner. Run few variants at once:
processes sharing one GPU time-slice it, and eight of them did not finish the UNet phase in 9 minutes on an
H100 (the autoencoder defaults came from the same code with `unet_steps=0`). Each variant is a name
followed by config overrides; tuples take comma-separated values:

    python scripts/generator_sweep.py --out /tmp/sweep base "wide unet_channels=48,64,96 unet_lr=1e-3"

Writes OUT/<name>/ (the pipeline), OUT/<name>.json and OUT/summary.json: per variant the autoencoder's
reconstruction pass rate, the oracle pass rates (overall and per aspect) on the unseen split and on a fixed
subset of the seen split, and the training time. Evaluation runs in fp32, as on CPU.
"""

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path


def parse_variant(spec: str):
    from alignloop.world.config import GeneratorTrainConfig

    name, *overrides = spec.split()
    defaults = GeneratorTrainConfig()
    changes = {}
    for item in overrides:
        key, value = item.split("=", 1)
        default = getattr(defaults, key)  # AttributeError names an unknown key
        if isinstance(default, tuple):
            changes[key] = tuple(type(default[0])(v) for v in value.split(","))
        else:
            changes[key] = type(default)(value)
    return name, dataclasses.replace(defaults, **changes)


def run_variant(spec: str, out: str, device: str, unseen_per_prompt: int, seen_prompts: int) -> dict:
    import torch

    from alignloop.models import load_generator
    from alignloop.world.evaluate import evaluate_generator
    from alignloop.world.train import train_generator

    torch.set_num_threads(1)
    name, config = parse_variant(spec)
    folder = Path(out) / name
    start = time.perf_counter()
    train_generator(folder, Path(out) / f"{name}-work", config, progress=False, device=device)
    train_s = time.perf_counter() - start
    pipe = load_generator(str(folder), device=device, dtype="fp32")
    unseen = evaluate_generator(pipe, "unseen", per_prompt=unseen_per_prompt, progress=False, batch_size=128)
    seen = evaluate_generator(pipe, "seen", per_prompt=2, max_prompts=seen_prompts, progress=False, batch_size=128)
    training = json.loads((folder / "training.json").read_text())
    result = {
        "name": name, "spec": spec, "config": dataclasses.asdict(config), "train_s": round(train_s, 1),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "vae_reconstruction_pass": training["vae_reconstruction_pass"],
        "unseen": {k: unseen[k] for k in ("overall", "aspects", "categories", "images")},
        "seen": {k: seen[k] for k in ("overall", "aspects", "categories", "images")},
    }
    (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"{name}: unseen {unseen['overall']:.3f} {unseen['aspects']}  seen {seen['overall']:.3f}  "
          f"vae {result['vae_reconstruction_pass']:.3f}  {train_s:.0f}s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help='"name key=value ..." (config overrides)')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parallel", type=int, default=8, help="variants trained at once")
    parser.add_argument("--unseen-per-prompt", type=int, default=2)
    parser.add_argument("--seen-prompts", type=int, default=100)
    args = parser.parse_args()
    for spec in args.variants:
        parse_variant(spec)  # fail before any training on a typo
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(spec, str(args.out), args.device, args.unseen_per_prompt, args.seen_prompts) for spec in args.variants]
    with multiprocessing.get_context("spawn").Pool(min(args.parallel, len(jobs))) as pool:
        results = pool.starmap(run_variant, jobs)
    from alignloop.machine import describe_machine

    summary = {"machine": describe_machine(), "results": results}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
