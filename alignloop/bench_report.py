"""`alignloop bench report`: every benchmark in one run, collected into one JSON file and the README's table.

Each benchmark runs as its own subprocess (`python -m alignloop bench NAME [--quick] --json`) under its own time
limit, and its last stdout line is parsed as the JSON object the benchmark convention promises (DESIGN.md). A
benchmark that fails or times out is recorded with the tail of its stderr, the others still run, and the command
exits 1 at the end. `feedback` gets a throwaway Kafka broker on free ports, started here for it and stopped after.

A full run writes bench/results.json and rewrites the README's table between BEGIN and END. A quick run only shows
that every benchmark still runs (CI): its figures are not the reported ones, so it writes elsewhere and never
touches the README.
"""

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BEGIN = "<!-- bench-table:start (written by `make bench`; edits here are overwritten) -->"
END = "<!-- bench-table:end -->"
STDERR_TAIL = 2000  # characters of a failed benchmark's stderr kept in the results


@dataclass(frozen=True)
class Bench:
    name: str
    headline: str         # what the ratio is, in a few words, for the README's table
    full_limit_s: int     # time limit of a full run (2 CPU cores)
    quick_limit_s: int    # time limit of a --quick run
    quick_args: tuple = ("--quick",)
    full_args: tuple = ()
    needs_kafka: bool = False


# Every `alignloop bench NAME` (a test checks this list against the parser, so a new bench is not forgotten).
BENCHES = [
    # No --quick: the budget check is one call; a single repeat after the warm-up keeps its meaning.
    Bench("generator", "3 s budget / median seconds for 16 images at 20 steps (>= 1: fast enough)",
          full_limit_s=15 * 60, quick_limit_s=5 * 60, quick_args=("--repeats", "1")),
    Bench("feedback", "ours / bare kafka-python events/s", full_limit_s=30 * 60, quick_limit_s=10 * 60,
          needs_kafka=True),
    Bench("serving", "throughput at 8 clients, batching on / off", full_limit_s=90 * 60, quick_limit_s=15 * 60),
    Bench("swap", "p99 latency during adapter swaps / without (smaller is better)", full_limit_s=90 * 60,
          quick_limit_s=15 * 60),
    # --quick does not record the CPU backend choice; the full run does, as `bench scorer` always has.
    Bench("scorer", "torch / onnxruntime, whole scorer at batch 64 (CPU)", full_limit_s=30 * 60,
          quick_limit_s=10 * 60),
    Bench("reward", "best-4-of-16 pass rate on unseen prompts, learned reward / CLIP score", full_limit_s=90 * 60,
          quick_limit_s=15 * 60),
    Bench("finetune", "best method's pass rate on unseen prompts / the base generator's", full_limit_s=4 * 3600,
          quick_limit_s=30 * 60),
]


def bench_argv(bench: Bench, quick: bool, bootstrap: str | None) -> list[str]:
    """The command line of one benchmark, run by the same interpreter as this one."""
    argv = [sys.executable, "-m", "alignloop", "bench", bench.name, *(bench.quick_args if quick else bench.full_args)]
    if bench.needs_kafka and bootstrap:
        argv += ["--bootstrap", bootstrap]
    return argv + ["--json"]


def run_one(name: str, argv: list[str], limit_s: float, log_dir: Path) -> dict:
    """Run one benchmark; its record: ok, seconds, date, and the parsed figures or the error."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    started = time.monotonic()
    date = _now()
    # Files, not pipes: a server a benchmark left behind cannot block us by holding a pipe open. Its own session,
    # so a timeout ends the benchmark and everything it started (the serving benches start servers).
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            returncode = proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _end_group(proc)
            returncode, timed_out = proc.returncode, True
    seconds = round(time.monotonic() - started, 1)
    record = {"ok": False, "seconds": seconds, "date": date, "command": argv[argv.index("bench"):]
              if "bench" in argv else argv}
    stderr_tail = err_path.read_text(errors="replace")[-STDERR_TAIL:]
    if timed_out:
        return {**record, "error": f"timed out after {limit_s:.0f} s", "stderr_tail": stderr_tail}
    if returncode != 0:
        return {**record, "error": f"exit status {returncode}", "stderr_tail": stderr_tail}
    lines = out_path.read_text(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
        if not isinstance(result, dict):
            raise ValueError(f"a JSON {type(result).__name__}, not an object")
    except (IndexError, ValueError) as parse_error:
        last = lines[-1][-200:] if lines else "(no output)"
        return {**record, "error": f"last stdout line is not a JSON object ({parse_error}): {last}",
                "stderr_tail": stderr_tail}
    return {**record, "ok": True, **summarize(result), "result": result}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _end_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def summarize(result: dict) -> dict:
    """The headline of a benchmark's JSON object: ratio, what it means, the machine, its top-level figures."""
    figures = {k: v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "ratio"}
    return {"ratio": result.get("ratio"), "ratio_means": result.get("ratio_means"),
            "machine": result.get("machine"), "figures": figures}


def run_benches(benches: list[Bench], quick: bool, log_dir: Path, argv_for=None, log=print) -> dict:
    """Every benchmark in turn, one record each. argv_for(bench, quick, bootstrap) gives each command line (default
    bench_argv)."""
    argv_for = argv_for or bench_argv
    records = {}
    for bench in benches:
        limit = bench.quick_limit_s if quick else bench.full_limit_s
        log(f"bench report: {bench.name} (limit {limit} s) ...")
        try:
            with _kafka(log) if bench.needs_kafka else contextlib.nullcontext() as bootstrap:
                record = run_one(bench.name, argv_for(bench, quick, bootstrap), limit, log_dir)
        except Exception as err:  # the broker did not start, or the command could not: this bench fails, not all
            record = {"ok": False, "seconds": 0.0, "date": _now(), "error": f"{type(err).__name__}: {err}"}
        state = f"ratio {record['ratio']}" if record["ok"] else f"FAILED: {record['error']}"
        log(f"bench report: {bench.name} {state} in {record['seconds']} s")
        records[bench.name] = {"headline": bench.headline, "quick": quick, **record}
    return records


@contextlib.contextmanager
def _kafka(log):
    """A throwaway single-node broker on free ports, only while the benchmark that needs it runs (2 cores: a
    broker idling beside the others would be measured too)."""
    from alignloop.feedback import broker

    path = Path(tempfile.mkdtemp(prefix="alignloop-bench-kafka-"))
    try:
        cluster = broker.up(port=broker.free_port(), controller_port=broker.free_port(), path=path, heap="384m",
                            topics=None)
        try:
            log(f"bench report: kafka at {cluster.bootstrap}")
            yield cluster.bootstrap
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def machine_line(machine: dict | None) -> str:
    """One cell: CPU, cores, GPU if any, load when it ran."""
    if not machine:
        return "?"
    parts = [f"{machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores"]
    if machine.get("gpu"):
        parts.append(machine["gpu"])
    if machine.get("load_average_1m") is not None:
        parts.append(f"load {machine['load_average_1m']}")
    return ", ".join(parts)


def render_table(report: dict) -> str:
    """The README's table of a report: a row per benchmark with its headline ratio, the machine and the date."""
    rows = ["| benchmark | headline ratio | means | seconds | machine | date |", "|---|---|---|---|---|---|"]
    for name, r in report["benches"].items():
        ratio = f"**{r['ratio']}**" if r["ok"] else f"failed: {r['error']}"
        if r.get("quick"):
            ratio += " (--quick)"
        rows.append(f"| `bench {name}` | {ratio} | {r.get('headline') or r.get('ratio_means') or ''} | "
                    f"{r['seconds']:.0f} | {machine_line(r.get('machine'))} | {r['date'][:10]} |")
    return "\n".join(rows)


def rewrite_readme(readme: Path, table: str) -> None:
    """Replace what lies between the markers, leaving the rest of the README as it is."""
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme} needs one {BEGIN!r} line followed by one {END!r} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def report_cli(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.machine import describe_machine
    from alignloop.settings import home

    # 1. Validate
    known = [b.name for b in BENCHES]
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        raise UserFacingError(f"--only takes {', '.join(known)}; got {', '.join(unknown)}")
    if args.quick and args.readme:
        raise UserFacingError("--readme is for full runs: --quick figures are not the reported ones")
    benches = [b for b in BENCHES if not args.only or b.name in args.only]
    out = args.out or (home() / "bench" / "results-quick.json" if args.quick else Path("bench") / "results.json")
    # 2. Run
    records = run_benches(benches, args.quick, log_dir=home() / "bench" / "logs",
                          log=lambda m: print(m, file=sys.stderr))
    # 3. Merge: a partial run (--only) keeps the other benchmarks' last records, each with its own date.
    previous = {}
    if args.only and out.exists():
        previous = json.loads(out.read_text()).get("benches", {})
    report = {"machine": describe_machine(), "date": _now(),
              "quick": args.quick, "benches": {**previous, **records}}
    # 4. Write
    from alignloop.durable import write_durably

    write_durably(out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"bench report: wrote {out}", file=sys.stderr)
    if args.readme:
        rewrite_readme(args.readme, render_table(report))
        print(f"bench report: rewrote the table in {args.readme}", file=sys.stderr)
    failed = [name for name, r in records.items() if not r["ok"]]
    if failed:
        print(f"bench report: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def add_benchmarks(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "report", help="every benchmark in turn: bench/results.json and the README's table",
        description="Runs every `alignloop bench NAME --json` as a subprocess under its own time limit, records each "
                    "one's figures (or its error: the others still run; exit 1 at the end) in one JSON file, and "
                    "with --readme rewrites the table between the README's bench-table markers. A full run takes "
                    "hours on 2 CPU cores. --quick only checks that each still runs: it writes "
                    "ALIGNLOOP_HOME/bench/results-quick.json and never a README.")
    p.add_argument("--quick", action="store_true", help="each benchmark's --quick variant (CI)")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None, help="a subset of the benchmarks")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON file (default bench/results.json; --quick: ALIGNLOOP_HOME/bench/results-quick.json)")
    p.add_argument("--readme", type=Path, default=None, help="rewrite the table in this README (full runs only)")
    p.set_defaults(func=report_cli)
