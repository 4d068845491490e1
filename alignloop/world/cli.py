"""`alignloop world ...`: train the bundled models, evaluate generators and CLIPs against the oracle."""

import json
from pathlib import Path

from alignloop.settings import home


def add_commands(sub) -> None:
    from alignloop.cli import add_config_args

    world = sub.add_parser("world", help="the shapes world: train the bundled models, evaluate against the oracle",
                           description="The shapes world: train the bundled tiny models and measure models "
                                       "against the oracle judge.")
    ws = world.add_subparsers(dest="world_command", required=True, metavar="COMMAND")

    from alignloop.world.config import ClipTrainConfig, GeneratorTrainConfig

    p = ws.add_parser("train-generator", help="train the tiny Stable Diffusion pipeline (resumable)",
                      description="Train the tiny SD-architecture pipeline (AutoencoderKL, then UNet + CLIP text "
                                  "encoder) on renders of every world prompt. Resumes from --work-dir.")
    p.add_argument("--out", type=Path, default=None, help="pipeline folder to write (default: the bundled one)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoints, for resuming (default: $ALIGNLOOP_HOME/train/generator)")
    p.add_argument("--device", default="cpu",
                   help="where to train (default cpu, as the bundled model was; cuda runs the same recipe faster)")
    add_config_args(p, GeneratorTrainConfig())
    p.set_defaults(func=_train_generator)

    p = ws.add_parser("train-clip", help="train the tiny open_clip model (resumable)",
                      description="Train the tiny open_clip model contrastively on world renders and on generator "
                                  "samples captioned by the oracle. Resumes from --work-dir.")
    p.add_argument("--out", type=Path, default=None, help="open_clip folder to write (default: the bundled one)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoints, for resuming (default: $ALIGNLOOP_HOME/train/clip)")
    p.add_argument("--generator", default="shapes-sd-tiny",
                   help="generator whose samples join the training data ('none' for renders only)")
    add_config_args(p, ClipTrainConfig())
    p.set_defaults(func=_train_clip)

    p = ws.add_parser("restamp-generator", help="stamp a trained generator with this world's signature",
                      description="After a change to the oracle only: generator training reads prompts and renders, "
                                  "never the oracle, so the trained generator is kept and stamped with the new world "
                                  "signature (the old one and --why are recorded in its training.json, and the "
                                  "autoencoder's reconstruction pass rate is measured again). Refuses a generator "
                                  "trained on other prompts or renders.")
    p.add_argument("--generator", type=Path, default=None, help="pipeline folder (default: the bundled one)")
    p.add_argument("--why", required=True, help="the reason, recorded in training.json")
    p.set_defaults(func=_restamp_generator)

    p = ws.add_parser("oracle-check", help="how well the oracle reads degraded renders whose truth is known",
                      description="Renders of random prompts, blurred (sigma 0.5, 0.7), noisy (sigma 8), with drifted "
                                  "colors or sub-pixel offsets, judged against their own prompt, another prompt and "
                                  "a one-attribute perturbation; touching and overlapping pairs (the count must "
                                  "fail); stretched shapes (the shape must fail).")
    p.add_argument("--images", type=int, default=500, help="images per condition (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=_oracle_check)

    p = ws.add_parser("eval", help="oracle pass rates of a generator on a split",
                      description="Generate --per-prompt images for every prompt of the split and judge them with "
                                  "the oracle. With --json the last line is one JSON object.")
    p.add_argument("--generator", default="shapes-sd-tiny", help="bundled name, diffusers folder or hub id")
    p.add_argument("--split", choices=("seen", "unseen", "all"), default="unseen")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--max-prompts", type=int, default=None, help="evaluate a fixed random subset of the split")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=_eval)

    p = ws.add_parser("eval-clip", help="how often a CLIP picks the true prompt of a render among 10",
                      description="Retrieval accuracy: the true prompt against 9 random prompts that the oracle "
                                  "says are false for the render.")
    p.add_argument("--clip", default="shapes-clip-tiny", help="bundled name or an open_clip folder")
    p.add_argument("--split", choices=("seen", "unseen", "all"), default="all")
    p.add_argument("--renders", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=_eval_clip)


def add_benchmarks(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "generator", help="seconds to draw 16 images at 20 steps with guidance, against the 3 s budget",
        description="Time one call that draws --images images at --steps DDIM steps with classifier-free "
                    "guidance (median of --repeats after a warm-up). The ratio is the budget over the median: "
                    "at least 1 when the generator is fast enough for every later measurement to run on it.")
    p.add_argument("--generator", default="shapes-sd-tiny", help="bundled name, diffusers folder or hub id")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=3.0, help="seconds allowed (default 3, the bundled model's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.set_defaults(func=_bench_generator)


def _train_generator(args) -> int:
    from alignloop.cli import config_from_args
    from alignloop.models import bundled_generator_dir
    from alignloop.world.config import GeneratorTrainConfig
    from alignloop.world.train import train_generator

    out = train_generator(args.out or bundled_generator_dir(), args.work_dir or home() / "train" / "generator",
                          config_from_args(GeneratorTrainConfig, args), device=args.device)
    print(f"wrote {out}")
    return 0


def _train_clip(args) -> int:
    from alignloop.cli import config_from_args
    from alignloop.models import bundled_clip_dir, resolve_generator
    from alignloop.world.config import ClipTrainConfig
    from alignloop.world.train import train_clip

    generator = None if args.generator == "none" else Path(resolve_generator(args.generator))
    out = train_clip(args.out or bundled_clip_dir(), args.work_dir or home() / "train" / "clip",
                     config_from_args(ClipTrainConfig, args), generator_dir=generator)
    print(f"wrote {out}")
    return 0


def _restamp_generator(args) -> int:
    from alignloop.models import bundled_generator_dir
    from alignloop.world.train import restamp_generator

    folder = args.generator or bundled_generator_dir()
    record = restamp_generator(folder, args.why)
    print(f"{folder}: world {record['world']}, autoencoder reconstructions pass {record['vae_reconstruction_pass']:.3f}")
    return 0


def _oracle_check(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.machine import describe_machine
    from alignloop.world.robustness import robustness_report
    from tqdm import tqdm

    if args.images < 1:
        raise UserFacingError(f"--images must be >= 1, got {args.images}")
    report = robustness_report(args.images, args.seed, progress=lambda xs: tqdm(xs, desc="conditions", disable=args.json))
    if not args.json:
        for name, row in report.items():
            print(f"{name:45s} {row['rate']:.4f}  (want {row['wants']})")
    print(json.dumps({"machine": describe_machine(), "images": args.images, "seed": args.seed, "conditions": report}))
    return 0


def _eval(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.models import ModelNotFoundError, load_generator
    from alignloop.world.evaluate import evaluate_generator

    if args.per_prompt < 1:
        raise UserFacingError(f"--per-prompt must be >= 1, got {args.per_prompt}")
    try:
        pipe = load_generator(args.generator, device=args.device)
    except ModelNotFoundError as err:
        raise UserFacingError(str(err)) from err
    result = evaluate_generator(pipe, args.split, args.per_prompt, args.steps, args.guidance, args.seed,
                                args.max_prompts)
    result["generator"] = args.generator
    if not args.json:
        print(f"overall {result['overall']:.3f}  aspects {result['aspects']}  categories {result['categories']}")
    else:
        print(json.dumps(result))
    return 0


def _eval_clip(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.models import ModelNotFoundError, load_clip
    from alignloop.world.evaluate import evaluate_clip_retrieval

    if args.renders < 1:
        raise UserFacingError(f"--renders must be >= 1, got {args.renders}")
    try:
        clip = load_clip(args.clip, device="cpu")
    except ModelNotFoundError as err:
        raise UserFacingError(str(err)) from err
    result = evaluate_clip_retrieval(clip, args.split, args.renders, seed=args.seed)
    result["clip"] = args.clip
    print(json.dumps(result) if args.json else f"retrieval accuracy {result['accuracy']:.3f} "
          f"({result['renders']} renders, 1 of {result['candidates']})")
    return 0


def _bench_generator(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.machine import describe_machine
    from alignloop.models import ModelNotFoundError, load_generator
    from alignloop.world.evaluate import time_generation
    from alignloop.world.grammar import split

    seen = len(split("seen"))  # distinct prompts to draw from
    for flag, value, low, high in (("--images", args.images, 1, seen), ("--steps", args.steps, 1, 1000),
                                   ("--repeats", args.repeats, 1, 1000)):
        if not low <= value <= high:
            raise UserFacingError(f"{flag} must be in {low}..{high}, got {value}")
    if args.budget <= 0:
        raise UserFacingError(f"--budget must be > 0, got {args.budget}")
    try:
        pipe = load_generator(args.generator, device=args.device)
    except ModelNotFoundError as err:
        raise UserFacingError(str(err)) from err
    timing = time_generation(pipe, args.images, args.steps, args.guidance, args.repeats)
    result = {"benchmark": "generator", "generator": args.generator, "machine": describe_machine(),
              "settings": {**{k: timing[k] for k in ("images", "steps", "guidance", "repeats")},
                           "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch.")},
              "budget_s": args.budget, "seconds_median": timing["seconds_median"], "seconds": timing["seconds"],
              "ratio": round(args.budget / max(timing["seconds_median"], 1e-3), 3),
              "ratio_means": f"budget {args.budget} s / median seconds (>= 1: within budget)"}
    if not args.json:
        print(f"{args.images} images, {args.steps} steps, guidance {args.guidance}: "
              f"{timing['seconds_median']:.2f} s (median of {args.repeats}; budget {args.budget} s)")
    print(json.dumps(result))
    return 0
