"""`alignloop train reward|rwr|ppo|refl|kto ...`, `alignloop nightly`, `alignloop experiment`, `alignloop bench reward`
and `alignloop bench finetune`.

Imports of torch and the models happen inside the command functions, keeping `alignloop --help` fast.
"""

import argparse
import json
from pathlib import Path


def add_commands(sub) -> None:
    from alignloop.cli import add_config_args
    from alignloop.trainer.config import RewardTrainConfig

    train = sub.add_parser("train", help="train from the feedback: the reward model, LoRA adapters",
                           description="Training jobs that learn from the users' votes.")
    tsub = train.add_subparsers(dest="train_command", required=True, metavar="COMMAND")

    p = tsub.add_parser(
        "reward", help="train the reward head on a snapshot's votes, gate it, publish it to the registry",
        description="Train the reward head (MSE on the vote + λ·prompt classification + pairwise loss) on a "
                    "snapshot's votes and images, measure it on held-out prompts against the live reward "
                    "model (the CLIP score when none is live), and publish it: live if not worse, else candidate.")
    p.add_argument("--snapshot", type=Path, required=True,
                   help="a snapshot folder (`alignloop feedback snapshot --out DIR`: its newest version), or one version")
    p.add_argument("--out", type=Path, default=None, help="where to write head.safetensors, metrics.jsonl, "
                   "report.json (default: ALIGNLOOP_HOME/train/reward/<time>)")
    p.add_argument("--registry", default=None,
                   help="registry URL or folder (default: ALIGNLOOP_REGISTRY or ALIGNLOOP_HOME/registry)")
    p.add_argument("--no-publish", action="store_true", help="train and measure only; publish nothing")
    p.add_argument("--clip", default="shapes-clip-tiny", help="CLIP whose embeddings the head reads (default: bundled)")
    p.add_argument("--clip-checkpoint", default=None, help="checkpoint file for an open_clip architecture name")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    add_config_args(p, RewardTrainConfig())
    p.set_defaults(func=_train_reward)

    from alignloop.trainer.config import METHOD_CONFIGS

    methods = {
        "rwr": "reward-weighted likelihood (Lee et al. eq. 2): votes as rewards, + β·pre-training loss",
        "ppo": "PPO on the denoising MDP (Pinterest, DDPO) with the live learned reward and color diversity",
        "refl": "reward gradient through the decoder, CLIP and head, with a KL term (after ReFL)",
        "kto": "Diffusion-KTO on the raw thumbs, no reward model",
    }
    for name, what in methods.items():
        config_class = METHOD_CONFIGS[name]
        p = tsub.add_parser(name, help=f"LoRA fine-tuning: {what}",
                            description=f"Fine-tune a LoRA on the UNet with {what}, from a snapshot's votes (each "
                                        "voted image redrawn from its recorded seed), evaluate it, and publish it "
                                        "to the registry as a candidate adapter. Under torchrun (`torchrun "
                                        "--nproc_per_node N -m alignloop train ...`; not ppo) it trains data-parallel, "
                                        "each process a shard of every batch; rank 0 alone writes and publishes.")
        p.add_argument("--snapshot", type=Path, required=True, help="a snapshot folder or one of its versions")
        p.add_argument("--out", type=Path, default=None, help="run folder: metrics.jsonl, checkpoint.pt, adapter/ "
                       f"(default: ALIGNLOOP_HOME/train/{name}/<time>); rerun with the same --out to resume")
        p.add_argument("--registry", default=None, help="registry URL or folder (default: ALIGNLOOP_REGISTRY or "
                       "ALIGNLOOP_HOME/registry)")
        p.add_argument("--no-publish", action="store_true", help="train and evaluate only; publish nothing")
        p.add_argument("--reward-version", default=None, help="reward model version to optimize (default: live)")
        p.add_argument("--eval-prompts", type=int, default=32, help="world prompts per split in the evaluation")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
        add_config_args(p, config_class())
        p.set_defaults(func=_train_lora, method=name, config_class=config_class)


    from alignloop.trainer.config import NightlyConfig

    p = sub.add_parser(
        "nightly", help="one turn of the loop: snapshot, reward model, fine-tune, evaluate, publish, canary",
        description="Consume the new feedback into a snapshot, retrain the reward model (its gate decides live), "
                    "fine-tune the live adapter (or the base) with --method, evaluate it against its parent on "
                    "seen prompts, publish it as a candidate and open the canary rollout unless it passed seen "
                    "prompts worse than its parent beyond chance (--max-drop, --worse-significance). A run that "
                    "dies is resumed by the next one at its first unfinished stage (or dropped with --abandon) and never "
                    "publishes twice; a second run while one holds the lock says who holds it and exits 3. "
                    "State under ALIGNLOOP_HOME/nightly.")
    p.add_argument("--registry", default=None, help="registry URL or folder (default: ALIGNLOOP_REGISTRY or "
                   "ALIGNLOOP_HOME/registry)")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default: ALIGNLOOP_KAFKA or 127.0.0.1:9092)")
    p.add_argument("--images", default=None, help="image store URL (default: file://ALIGNLOOP_HOME/images)")
    p.add_argument("--topic-prefix", default="", help="read <prefix>alignloop.generations / <prefix>alignloop.feedback")
    p.add_argument("--abandon", action="store_true", help="drop an unfinished run instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the run's state as one JSON object on the last line")
    add_config_args(p, NightlyConfig())
    p.set_defaults(func=_nightly)

    from alignloop.trainer.config import ExperimentConfig

    p = sub.add_parser(
        "experiment", help="the closed loop end to end: simulated users, Kafka, the service, nightly cycles, a report",
        description="Start Kafka and the service on the bundled shapes-world model, drive it over HTTP with "
                    "simulated users (seen prompts, thumbs from the simulated rater through /feedback), run the "
                    "nightly job after each cycle's traffic, keep the traffic going while the guardrail decides on "
                    "its canary, then measure every generator and reward on seen and unseen prompts and write "
                    "OUT/experiment.json and OUT/report.md with plots and image grids. Exits 1 when a check fails "
                    "(a failed request, a vote lost, a promotion the oracle rates worse, or a pass rate that did not "
                    "move up). The defaults are the full run's; --quick uses QUICK_EXPERIMENT "
                    "(alignloop/trainer/config.py) for every flag not given.")
    p.add_argument("--out", type=Path, required=True, help="an empty or new folder for everything the run writes")
    p.add_argument("--quick", action="store_true", help="the smoke test: a few requests, steps and prompts per stage "
                   "(5-6 minutes on 2 CPU cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print experiment.json's content as one line at the end")
    add_config_args(p, ExperimentConfig())
    # Only the flags given reach the config, so that --quick's values apply to the others.
    for action in p._actions:
        if action.dest in ExperimentConfig.__dataclass_fields__:
            action.default = argparse.SUPPRESS
    p.set_defaults(func=_experiment)


def _experiment(args) -> int:
    import os

    from alignloop.cli import config_from_args
    from alignloop.errors import UserFacingError
    from alignloop.trainer.config import QUICK_EXPERIMENT, ExperimentConfig
    from alignloop.trainer.experiment import run_experiment

    if args.out.exists() and any(args.out.iterdir()):
        raise UserFacingError(f"--out {args.out} is not empty: an experiment starts from nothing (a fresh registry, "
                              "topics and home); give a new folder")
    config = config_from_args(ExperimentConfig, args, base=QUICK_EXPERIMENT if args.quick else None)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["ALIGNLOOP_HOME"] = str((args.out / "home").resolve())  # this process, the service, the nightly job
    report = run_experiment(config, args.out.resolve(), quick=args.quick, progress=not args.no_progress,
                            log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"report: {args.out / 'report.md'}; checks: " + ", ".join(
            f"{name} {'ok' if ok else 'FAILED'}" for name, ok in report["checks"].items()))
    return 0 if all(report["checks"].values()) else 1


def add_benchmarks(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "reward", help="learned reward vs CLIP score on unseen prompts: preference accuracy, best 4 of 16",
        description="In the shapes world: votes from the simulated rater on base-model samples of seen prompts "
                    "train the reward head (and two ablations); on unseen prompts it is compared with the CLIP "
                    "score and the oracle. The ratio is the learned reward's best-4-of-16 pass rate over the CLIP "
                    "score's. Probes: heads on the oracle's own verdicts, and the CLIP image tower tuned on the "
                    "votes. Full run: ~3,000 samples and every unseen prompt (about 17 minutes on 2 CPU cores).")
    p.add_argument("--quick", action="store_true", help="256 samples, 6 unseen prompts, 20 epochs (about 2 minutes)")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=None, help="samples to vote on (default 3000; --quick 256)")
    p.add_argument("--eval-prompts", type=int, default=None, help="unseen prompts to evaluate (default all; --quick 6)")
    p.set_defaults(func=_bench_reward)

    p = bench_subparsers.add_parser(
        "finetune", help="RWR, PPO, ReFL and Diffusion-KTO side by side from the same votes, on unseen prompts",
        description="In the shapes world: ~3,000 rater votes (flip 0.1) on base samples of seen prompts and the "
                    "reward head trained on them; each method's LoRA trained from the base and evaluated on unseen "
                    "prompts (4 seeded images per prompt): oracle pass rate per aspect, fidelity (Fréchet distance "
                    "of CLIP embeddings against renders), diversity, seconds, a grid per method. The ratio is the "
                    "best method's pass rate over the base's.")
    p.add_argument("--quick", action="store_true", help="a few samples and steps: shows each code path learns")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of rwr ppo refl kto (default: all)")
    p.add_argument("--out", type=Path, default=None, help="folder for the adapters, grids and bench-finetune.json "
                   "(default: ALIGNLOOP_HOME/bench/finetune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.set_defaults(func=_bench_finetune)


def _train_reward(args) -> int:
    from alignloop.cli import config_from_args
    from alignloop.trainer.reward_model import RewardTrainConfig, train_reward

    config = config_from_args(RewardTrainConfig, args)
    report = train_reward(args.snapshot, config, out=args.out, registry=args.registry, publish=not args.no_publish,
                          clip_spec=args.clip, clip_checkpoint=args.clip_checkpoint, progress=not args.no_progress,
                          log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    return 0


def _nightly(args) -> int:
    from alignloop.feedback.cli import _user_errors

    return _user_errors(_run_nightly)(args)  # an unreachable broker or a second snapshot writer: a message


def _run_nightly(args) -> int:
    import sys

    from alignloop.cli import config_from_args
    from alignloop.trainer.config import NightlyConfig
    from alignloop.trainer.nightly import LOCKED_EXIT, NightlyLocked, run_nightly

    config = config_from_args(NightlyConfig, args)
    try:
        state = run_nightly(config, registry_url=args.registry, bootstrap=args.bootstrap, images_url=args.images,
                            topic_prefix=args.topic_prefix, abandon=args.abandon, progress=not args.no_progress,
                            log=(lambda *a: None) if args.json else print)
    except NightlyLocked as err:
        print(f"alignloop: {err}", file=sys.stderr)
        return LOCKED_EXIT
    if args.json:
        print(json.dumps(state))
    return 0


def _bench_reward(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.trainer import reward_bench

    for flag, value in (("--train-images", args.train_images), ("--eval-prompts", args.eval_prompts)):
        if value is not None and value < 1:
            raise UserFacingError(f"{flag} must be >= 1, got {value}")
    report = reward_bench.run(quick=args.quick, seed=args.seed, train_images=args.train_images,
                              eval_prompts=args.eval_prompts, progress=not args.json)
    if not args.json:
        for line in reward_bench.summary_lines(report):
            print(line)
    text = json.dumps(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _train_lora(args) -> int:
    from alignloop.cli import config_from_args
    from alignloop.trainer.finetune_job import finetune_from_snapshot

    config = config_from_args(args.config_class, args)
    report = finetune_from_snapshot(args.method, args.snapshot, config, out=args.out, registry=args.registry,
                                    publish=not args.no_publish, reward_version=args.reward_version,
                                    eval_prompts=args.eval_prompts, progress=not args.no_progress,
                                    log=(lambda *a: None) if args.json else print)
    if args.json and report is not None:  # None: a torchrun rank > 0, whose rank 0 reports
        print(json.dumps(report))
    return 0


def _bench_finetune(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.settings import home
    from alignloop.trainer import finetune_bench

    methods = tuple(args.methods or finetune_bench.METHODS)
    unknown = sorted(set(methods) - set(finetune_bench.METHODS))
    if unknown:
        raise UserFacingError(f"--methods: unknown {unknown}; choose from {' '.join(finetune_bench.METHODS)}")
    report = finetune_bench.run(args.out or home() / "bench" / "finetune", quick=args.quick, seed=args.seed,
                                methods=methods, progress=not args.json,
                                log=(lambda *a: None) if args.json else print)
    if not args.json:
        for line in finetune_bench.summary_lines(report):
            print(line)
    print(json.dumps(report))
    return 0
