"""Command line for the kernels: `alignloop bench scorer [--quick] [--json] [--out PATH]`."""

import argparse
import json
from pathlib import Path


def add_benchmarks(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "scorer", help="reward scorer: torch vs onnxruntime on CPU; fused Triton vs eager vs torch.compile on CUDA",
        description="Benchmarks the reward scorer's backends side by side and prints one JSON object on the "
        "last line. On CPU it also records which of torch / onnxruntime was faster, for the scorer's "
        "automatic backend choice (kernels/cpu_choice.json unless --record says otherwise).")
    p.add_argument("--quick", action="store_true", help="fewer repetitions; does not record the CPU choice unless --record is given")
    p.add_argument("--json", action="store_true", help="print the JSON object on the last line")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    p.add_argument("--batches", default="16,64,256", help="comma-separated batch sizes (default 16,64,256)")
    p.add_argument("--record", type=Path, default=None,
                   help="where to record the CPU choice (default: $ALIGNLOOP_CPU_CHOICE or kernels/cpu_choice.json)")
    p.add_argument("--no-record", action="store_true", help="do not record the CPU choice")
    p.set_defaults(func=_bench_scorer)


def _bench_scorer(args: argparse.Namespace) -> int:
    from alignloop.cli import UserFacingError
    from alignloop.kernels import bench
    from alignloop.kernels.config import ScorerConfig

    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        batches = ()
    if not batches or any(b < 1 or b > 4096 for b in batches):
        raise UserFacingError(f"--batches must be comma-separated integers in 1..4096, got {args.batches!r}")
    record = None
    if not args.no_record and (args.record or not args.quick):
        record = args.record or ScorerConfig().resolved_cpu_choice_path()
    report = bench.run(quick=args.quick, batches=batches, record_path=record)
    for line in bench.summary_lines(report):
        print(line)
    text = json.dumps(report, sort_keys=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    return 0
