"""`alignloop bench serving`: what HTTP and batching cost or buy, measured side by side in one run.

1. In-process: the sampler (micro-batcher + scorer, the same code the service runs) called directly,
   one request at a time: p50 latency at n=16, k=4.
2. HTTP, cross-request batching on: `alignloop serve` in a subprocess; the same requests one at a time
   (p50 latency, scoring share from the response timings), then `clients` concurrent clients (throughput).
3. HTTP, cross-request batching off (each diffusion pass holds one request): the same concurrent load.

Figures: latency_ratio = p50 HTTP / p50 in-process (goal <= 1.15), batching_ratio = throughput on / off
(goal >= 1.5; the headline `ratio`), scoring_share = scoring time / request time at n=16 (goal <= 5% on CPU).
The server spools its events locally (no broker needed): producing is a non-blocking hand-off either way.
Every side ranks with a learned reward head of Lee et al.'s shape (two hidden layers of 1024; random weights,
the same cost as trained ones), published live in each server's registry, so scoring is timed on the path a
trained model takes. Prints one JSON object on its last line.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from alignloop.machine import describe_machine

N, K = 16, 4
HEAD_HIDDEN = (1024, 1024)  # Lee et al.'s head


def main(args) -> int:
    steps = args.steps or (4 if args.quick else 20)
    requests_per_side = args.requests or (4 if args.quick else 15)
    clients = args.clients
    per_client = 1 if args.quick else 3
    guidance = 7.5
    prompts = bench_prompts(64)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    load_before = os.getloadavg()

    # 1. In-process sampler
    say(f"[1/3] in-process sampler: {requests_per_side} sequential requests at n={N}, k={K}, steps={steps}")
    inproc = _in_process(prompts, requests_per_side, steps, guidance)

    with tempfile.TemporaryDirectory(prefix="alignloop-bench-serving-") as tmp:
        # 2. HTTP with cross-request batching
        say("[2/3] HTTP, cross-request batching on: sequential latency, then "
            f"{clients} clients x {per_client} requests")
        head_path = save_bench_head(Path(tmp) / "bench-head.safetensors")
        with BenchServer(Path(tmp) / "on", batching=True, steps=steps, head_path=head_path,
                     name="serving-batching_on") as server:
            http_seq = _sequential(server.url, prompts, requests_per_side, steps, guidance)
            before = _pass_stats(server.url)
            on = _concurrent(server.url, prompts, clients, per_client, steps, guidance)
            on["passes"] = _pass_delta(before, _pass_stats(server.url))
        if on["error_count"]:
            on["server_log"] = server.keep_log()  # the temporary folder, and the log in it, go away below
        # 3. HTTP without it
        say(f"[3/3] HTTP, cross-request batching off: {clients} clients x {per_client} requests")
        with BenchServer(Path(tmp) / "off", batching=False, steps=steps, head_path=head_path,
                     name="serving-batching_off") as server:
            before = _pass_stats(server.url)
            off = _concurrent(server.url, prompts, clients, per_client, steps, guidance)
            off["passes"] = _pass_delta(before, _pass_stats(server.url))
        if off["error_count"]:
            off["server_log"] = server.keep_log()

    p50_http = statistics.median(r["latency_s"] for r in http_seq)
    p50_inproc = statistics.median(inproc["latencies_s"])
    scoring_share = statistics.mean(r["timings"]["scoring_ms"] / r["timings"]["total_ms"] for r in http_seq)
    batching_ratio = on["requests_per_s"] / off["requests_per_s"]
    latency_ratio = p50_http / p50_inproc
    result = {
        "benchmark": "serving",
        "machine": _machine(load_before),
        "settings": {"n": N, "k": K, "steps": steps, "guidance": guidance, "sequential_requests": requests_per_side,
                     "clients": clients, "requests_per_client": per_client, "quick": bool(args.quick),
                     "max_batch_images": 64, "generator": "shapes-sd-tiny", "clip": "shapes-clip-tiny",
                     "reward_model": f"learned head {HEAD_HIDDEN} (random weights), live in the registry",
                     "kafka": "events spooled locally (no broker), emit() is non-blocking either way"},
        "ratio": round(batching_ratio, 3),
        "ratio_means": "headline: throughput of 8 concurrent clients with cross-request batching on / off (bigger is "
                       "better, goal >= 1.5). Also: latency_ratio = p50 HTTP / p50 in-process (smaller is better, "
                       "goal <= 1.15); scoring_share = scoring / request time at n=16 (goal <= 0.05 on CPU)",
        "batching_ratio": round(batching_ratio, 3),
        "latency_ratio": round(latency_ratio, 3),
        "scoring_share": round(scoring_share, 4),
        "goals_met": {"latency_ratio<=1.15": latency_ratio <= 1.15, "batching_ratio>=1.5": batching_ratio >= 1.5,
                      "scoring_share<=0.05": scoring_share <= 0.05},
        "latency": {
            "p50_http_s": round(p50_http, 4), "p50_in_process_s": round(p50_inproc, 4),
            "http_s": [round(r["latency_s"], 4) for r in http_seq],
            "in_process_s": [round(x, 4) for x in inproc["latencies_s"]],
            "in_process_scoring_share": round(inproc["scoring_share"], 4),
            "http_mean_timings_ms": {key: round(statistics.mean(r["timings"][key] for r in http_seq), 2)
                                     for key in http_seq[0]["timings"]},
        },
        "throughput": {"batching_on": on, "batching_off": off},
    }
    print(json.dumps(result))
    return 0


# -- sides ----------------------------------------------------------------------------------------------------

def _in_process(prompts, count, steps, guidance) -> dict:
    import torch

    from alignloop.serving.config import ServingConfig
    from alignloop.serving.sampler import load_sampler

    from alignloop.rewards import RewardScorer

    config = ServingConfig(device="cpu" if not torch.cuda.is_available() else "")
    torch.set_num_threads(os.cpu_count() or 1)
    sampler, batcher = load_sampler(config)
    clip = sampler.reward.current()[0].clip
    sampler.reward.swap(RewardScorer(clip, head=_head(clip), backend=config.scorer_backend), "reward:bench")
    try:
        sampler.sample(prompts[0], n=N, k=K, steps=steps, guidance=guidance, seed=0)  # warm-up
        latencies, shares = [], []
        for i in range(count):
            started = time.perf_counter()
            best = sampler.sample(prompts[i % len(prompts)], n=N, k=K, steps=steps, guidance=guidance, seed=1000 + i)
            latencies.append(time.perf_counter() - started)
            shares.append(best.scoring_s / latencies[-1])
        return {"latencies_s": latencies, "scoring_share": statistics.mean(shares)}
    finally:
        batcher.close()
        del sampler, batcher


def _post(url, body, timeout=600):
    import requests

    started = time.perf_counter()
    response = requests.post(url + "/generate", json=body, timeout=timeout)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    if not response.json()["reward_model"].startswith("reward:"):
        raise RuntimeError(f"the server ranked with {response.json()['reward_model']!r}, not the benchmark's head")
    return {"latency_s": elapsed, "timings": response.json()["timings"]}


def _sequential(url, prompts, count, steps, guidance) -> list:
    _post(url, {"prompt": prompts[0], "n": N, "k": K, "steps": steps, "guidance": guidance, "seed": 0})  # warm-up
    return [_post(url, {"prompt": prompts[i % len(prompts)], "n": N, "k": K, "steps": steps, "guidance": guidance,
                        "seed": 1000 + i}) for i in range(count)]


def _concurrent(url, prompts, clients, per_client, steps, guidance) -> dict:
    results, errors = [], []
    barrier = threading.Barrier(clients)

    def client(c):
        barrier.wait()
        for j in range(per_client):
            body = {"prompt": prompts[(c * per_client + j) % len(prompts)], "n": N, "k": K, "steps": steps,
                    "guidance": guidance, "seed": 5000 + c * per_client + j, "user_id": f"bench-{c}"}
            try:
                results.append(_post(url, body))
            except Exception as err:  # counted, reported
                errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = sorted(r["latency_s"] for r in results)
    return {"requests": len(results), "errors": errors[:5], "error_count": len(errors), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 4), "images_sampled_per_s": round(len(results) * N / wall, 2),
            "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "max_latency_s": round(latencies[-1], 3) if latencies else None}


def _pass_stats(url) -> dict:
    """Cumulative pass counters from the server's /metrics."""
    import requests

    text = requests.get(url + "/metrics", timeout=30).text
    return {name: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
            for name in ("alignloop_serving_pass_images_sum", "alignloop_serving_pass_images_count",
                         "alignloop_serving_pass_requests_sum", "alignloop_serving_pass_seconds_sum")}


def _pass_delta(before: dict, after: dict) -> dict:
    """Diffusion passes run between two snapshots: how many, how full, how long."""
    d = {name: after[name] - before[name] for name in after}
    count = d["alignloop_serving_pass_images_count"] or 1
    return {"passes": int(d["alignloop_serving_pass_images_count"]),
            "mean_images_per_pass": round(d["alignloop_serving_pass_images_sum"] / count, 2),
            "mean_requests_per_pass": round(d["alignloop_serving_pass_requests_sum"] / count, 2),
            "mean_pass_s": round(d["alignloop_serving_pass_seconds_sum"] / count, 3),
            "seconds_per_image": round(d["alignloop_serving_pass_seconds_sum"]
                                       / max(d["alignloop_serving_pass_images_sum"], 1), 4)}


class BenchServer:
    """`alignloop serve` for one benchmark side (serving/local.py), ranking with the head at `head_path`, published live
    in its registry. Its log lives in `home`, usually a temporary folder: `keep_log()` copies it out (a side with
    failed requests calls it; a failed start or an exception inside the `with` block does it by itself)."""

    def __init__(self, home: Path, batching: bool, steps: int, head_path: Path, name: str = "server"):
        self.home = home
        self.head_path = head_path
        self.batching = batching
        self.steps = steps
        self.name = name  # "<bench>-<side>": what a kept log is called
        self.kept_log = None  # where keep_log() copied the log to
        self.server = None

    def __enter__(self):
        from alignloop.feedback import broker
        from alignloop.registry import Registry
        from alignloop.serving.local import NO_RATE_LIMITS, ServerError, start_server

        self.home.mkdir(parents=True, exist_ok=True)
        Registry(self.home / "registry").publish(
            "reward", {"head.safetensors": self.head_path}, state="live", who="bench serving",
            why="time scoring with a head of Lee et al.'s shape (random weights)")
        try:
            self.server = start_server(self.home, {
                "ALIGNLOOP_SERVE_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker.free_port()}",  # nobody there: spool
                "ALIGNLOOP_SERVE_CROSS_REQUEST_BATCHING": "1" if self.batching else "0",
                "ALIGNLOOP_SERVE_DEFAULT_STEPS": str(self.steps), **NO_RATE_LIMITS}, timeout_s=900)
        except ServerError as err:
            raise ServerError(f"{err}\n(log kept at {self.keep_log()})") from None
        self.url = self.server.url
        return self

    def __exit__(self, *exc):
        self.server.stop()
        if exc and exc[0] is not None:  # the benchmark fails: its temporary folder, and this log, are about to go
            self.keep_log()

    def keep_log(self) -> str:
        """Copy the server's log to $ALIGNLOOP_HOME/bench/logs/<name>-<UTC timestamp>.log (once), say where on
        stderr, and return that path: a failed request's traceback is only in this log."""
        if self.kept_log is None:
            from datetime import datetime, timezone

            from alignloop.settings import home

            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            target = home() / "bench" / "logs" / f"{self.name}-{stamp}.log"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.home / "serve.log", target)
            self.kept_log = str(target)
            print(f"bench: server log of {self.name} kept at {target}", file=sys.stderr, flush=True)
        return self.kept_log


def _head(clip):
    import torch

    from alignloop.rewards import RewardHead

    torch.manual_seed(0)
    return RewardHead(clip.embed_dim, HEAD_HIDDEN)


def save_bench_head(path: Path) -> Path:
    """The benchmark's head, saved with the bundled CLIP's hash (what a worker checks before using it)."""
    from alignloop.models import load_clip
    from alignloop.rewards import clip_hash, save_head

    clip = load_clip(device="cpu")
    return save_head(_head(clip), path, {"clip_hash": clip_hash(clip)})


def bench_prompts(count: int) -> list:
    """Shapes-world prompts, fixed by a seed so every side of the comparison draws the same ones."""
    import random

    from alignloop.world import sample_prompts

    return [p.text for p in sample_prompts(random.Random(0), count)]


def _machine(load_before) -> dict:
    return {**describe_machine(), "load_average_at_start": [round(x, 2) for x in load_before],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
