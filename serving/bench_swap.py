"""`alignloop bench swap`: what hot-swapping adapters costs, measured side by side in one run.

1. In-process, on the worker's own code (AdapterSlots + RolloutFollower on the bundled pipeline and a local
   registry): 50 rollouts, each promoting a new adapter, so 50 swaps through the slots. Per swap: validation
   (file checks + smoke generation) and switch (loading into a slot, by hot-swap once the slots are full, until
   the routing table names it) separately; the process's resident memory before and after the 50 swaps.
2. Over HTTP (`alignloop serve`, one worker), `clients` concurrent clients, in three phases of equal length:
   one arm (every user on the live adapter), two arms (a 50% canary: the batcher splits passes by adapter),
   and one arm while the live adapter is promoted `http_swaps` times. Figures: failed requests, p99 latency
   during swaps and without, throughput with one arm and with two, and the switches the worker made: a
   promotion it finds while every slot still serves queued requests waits for one, and the worker then goes
   straight to the newest rollout, so under a deep queue fewer switches than promotions is expected.

Headline `ratio` = p99 latency during swaps / p99 without (1.0 = swaps cost the requests nothing; smaller is
better). Prints one JSON object on its last line.
"""

import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from alignloop.machine import describe_machine


def main(args) -> int:
    quick = bool(args.quick)
    steps = args.steps or (4 if quick else 20)
    n, k = (8, 2) if quick else (16, 4)
    phase_s = args.phase_s or (12.0 if quick else 40.0)
    http_swaps = 4 if quick else 10
    swaps = args.swaps
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="alignloop-bench-swap-") as tmp:
        tmp = Path(tmp)
        say(f"[1/2] in-process: {swaps} swaps through the adapter slots")
        in_process = _in_process(tmp / "inproc", swaps)
        say(f"[2/2] HTTP: {args.clients} clients, {phase_s:.0f} s each: one arm, two arms, one arm with "
            f"{http_swaps} swaps")
        http = _http(tmp / "http", args.clients, phase_s, http_swaps, steps, n, k)

    p99_with, p99_without = http["during_swaps"]["p99_latency_s"], http["one_arm"]["p99_latency_s"]
    ratio = p99_with / p99_without if p99_without else float("nan")
    split_cost = 1 - http["two_arms"]["requests_per_s"] / http["one_arm"]["requests_per_s"]
    result = {
        "benchmark": "swap",
        "machine": {**describe_machine(), "load_average_at_start": [round(x, 2) for x in load_before],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"quick": quick, "n": n, "k": k, "steps": steps, "clients": args.clients, "phase_s": phase_s,
                     "in_process_swaps": swaps, "http_swaps": http_swaps, "max_adapters": 3, "max_adapter_rank": 16,
                     "adapter_rank": 4, "generator": "shapes-sd-tiny", "rollout_poll_s": 0.5},
        "ratio": round(ratio, 3),
        "ratio_means": "p99 request latency while the live adapter is swapped / p99 without swaps, 8 clients "
                       "(1.0 = swaps cost the requests nothing; smaller is better)",
        "swaps": in_process["swaps"] + http["during_swaps"]["switches_applied"],
        "swaps_means": "in-process swaps + the routing-table switches the HTTP worker made while swapped under load "
                       "(promotions it found while every slot served adapters still queued are skipped to the newest)",
        "failed_requests": sum(http[p]["failed"] for p in ("one_arm", "two_arms", "during_swaps")),
        "server_log": http.get("server_log"),  # kept only when a request failed: its traceback is in there
        "validation_s": in_process["validation_s"],
        "switch_s": in_process["switch_s"],
        "p99_latency_s": {"during_swaps": p99_with, "without_swaps": p99_without},
        "throughput_requests_per_s": {"one_arm": http["one_arm"]["requests_per_s"],
                                      "two_arms": http["two_arms"]["requests_per_s"]},
        "split_passes_cost": round(split_cost, 4),
        "mixed_adapter_passes": ("not tried: splitting passes by arm cost at most 10% here" if split_cost <= 0.10
                                 else "not implemented yet: splitting passes by arm cost over 10% here; peft's "
                                      "per-sample adapter_names is the next thing to try"),
        "resident_memory_mib": in_process["resident_memory_mib"],
        "in_process": in_process,
        "http": http,
    }
    print(json.dumps(result))
    return 0


# -- 1. in-process -------------------------------------------------------------------------------------------------

def _in_process(tmp: Path, swaps: int) -> dict:
    import torch

    from alignloop import rollout
    from alignloop.adapters import base_model_identity
    from alignloop.models import load_generator
    from alignloop.registry import Registry
    from alignloop.serving.adapter_slots import AdapterSlots, RolloutFollower
    from alignloop.serving.batching import DiffusionBatcher
    from alignloop.serving.config import ArmSpec

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = load_generator(device="cpu")
    base_unet = copy.deepcopy(pipe.unet)
    identity = base_model_identity(pipe)
    registry = Registry(tmp / "registry")
    versions = [publish_random_adapter(registry, base_unet, tmp / f"a{i}", seed=i, identity=identity)
                for i in range(swaps)]
    batcher = DiffusionBatcher(pipe, max_batch_images=64, wait_ms=0)
    slots = AdapterSlots(pipe, batcher, max_slots=3, max_rank=16)
    batcher.activate = slots.activate
    follower = RolloutFollower(slots, str(tmp / "registry"), (ArmSpec("A", "base", 1.0),))
    rows = []
    try:
        rss = [_rss_mib()]
        for version in versions:
            rollout.promote(registry, version, "bench swap", "swap")
            started = time.perf_counter()
            assert follower.reconcile(), f"the follower did not switch to {version}"
            total = time.perf_counter() - started
            t = slots.last_timings
            rows.append({"validate_s": t["validate_s"], "load_s": t["load_s"], "smoke_s": t["smoke_s"],
                         "reconcile_s": total})
            rss.append(_rss_mib())
            batcher.submit("three red circles", [1, 2], 2, 5.0, adapter=version).result(timeout=120)  # serve it
    finally:
        batcher.close()
    return {
        "swaps": len(rows),
        "validation_s": _summary([r["validate_s"] + r["smoke_s"] for r in rows]),
        "validation_parts_s": {"file_checks": _summary([r["validate_s"] for r in rows]),
                               "smoke_generation": _summary([r["smoke_s"] for r in rows])},
        "switch_s": _summary([r["load_s"] for r in rows]),
        "reconcile_s": _summary([r["reconcile_s"] for r in rows]),
        "resident_memory_mib": {"before": round(rss[0], 1), "after_3_swaps": round(rss[min(3, len(rss) - 1)], 1),
                                f"after_{len(rows)}_swaps": round(rss[-1], 1),
                                "growth_after_slots_filled": round(rss[-1] - rss[min(3, len(rss) - 1)], 1)},
        "resident_adapters_at_end": len(slots.resident()),
    }


def publish_random_adapter(registry, base_unet, folder: Path, seed: int, identity: dict, rank: int = 4) -> str:
    """A LoRA adapter with random non-zero weights, published as a candidate."""
    import torch

    from alignloop import rollout
    from alignloop.adapters import adapter_config_record, lora_config, save_adapter

    unet = copy.deepcopy(base_unet)
    unet.add_adapter(lora_config(rank), adapter_name="bench")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    save_adapter(unet, folder, "bench")
    manifest = rollout.publish_adapter(registry, folder, base=identity,
                                       config=adapter_config_record(unet.peft_config["bench"]),
                                       who="bench swap", why="random adapter for the benchmark")
    return manifest.version


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- 2. HTTP ---------------------------------------------------------------------------------------------------------

def _http(tmp: Path, clients: int, phase_s: float, http_swaps: int, steps: int, n: int, k: int) -> dict:
    from alignloop import rollout
    from alignloop.adapters import base_model_identity
    from alignloop.models import load_generator
    from alignloop.registry import Registry
    from alignloop.serving.bench import BenchServer, bench_prompts, save_bench_head

    tmp.mkdir(parents=True)
    base_unet = load_generator(device="cpu").unet
    identity = base_model_identity("shapes-sd-tiny")
    prompts = bench_prompts(64)
    head = save_bench_head(tmp / "head.safetensors")
    server = BenchServer(tmp / "home", batching=True, steps=steps, head_path=head, name="swap-http")
    registry = Registry(tmp / "home" / "registry")
    versions = [publish_random_adapter(registry, base_unet, tmp / f"a{i}", seed=1000 + i, identity=identity)
                for i in range(http_swaps + 2)]
    rollout.promote(registry, versions[0], "bench swap", "live before the server starts")
    body = {"n": n, "k": k, "steps": steps, "guidance": 7.5}
    with server:
        _load(server.url, clients, 3.0, prompts, body)  # warm-up
        one_arm = _load(server.url, clients, phase_s, prompts, body)
        rollout.start_canary(registry, versions[1], 0.5, "bench swap", "two arms")
        time.sleep(2.0)  # every worker on the two-arm rollout
        two_arms = _load(server.url, clients, phase_s, prompts, body)
        rollout.promote(registry, versions[1], "bench swap", "back to one arm")
        time.sleep(2.0)

        def swapper(stop: threading.Event):
            for version in versions[2:]:
                if stop.wait(phase_s / (http_swaps + 1)):
                    return
                rollout.promote(registry, version, "bench swap", "swap under load")

        switches_before = rollout_switches(server.url)
        during = _load(server.url, clients, phase_s, prompts, body, during=swapper)
        during["switches_applied"] = rollout_switches(server.url) - switches_before
    during["promotions"] = http_swaps
    during["adapters_served"] = len(during.pop("adapters"))
    for phase in (one_arm, two_arms):
        phase["adapters_served"] = sorted(phase.pop("adapters"))
    result = {"one_arm": one_arm, "two_arms": two_arms, "during_swaps": during}
    if any(phase["failed"] for phase in (one_arm, two_arms, during)):
        result["server_log"] = server.keep_log()  # before the temporary folder, and the log in it, go away
    return result


def rollout_switches(url: str) -> int:
    """The worker's routing-table switches so far (alignloop_serving_rollout_switches_total on /metrics)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=60).text
    return int(sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "alignloop_serving_rollout_switches_total"))


def _load(url: str, clients: int, duration_s: float, prompts: list, body: dict, during=None) -> dict:
    """`clients` threads posting /generate back to back for `duration_s` (plus what is in flight)."""
    import requests

    latencies, failures, adapters = [], [], set()
    stop = threading.Event()

    def client(c: int) -> None:
        j = 0
        while not stop.is_set():
            request = {**body, "prompt": prompts[(c * 7 + j) % len(prompts)], "seed": 10_000 + c * 1000 + j,
                       "user_id": f"bench-{c}-{j}"}
            j += 1
            started = time.perf_counter()
            try:
                response = requests.post(url + "/generate", json=request, timeout=600)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    adapters.add(response.json()["adapter"])
                else:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
            except requests.RequestException as err:
                failures.append(repr(err))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    side = threading.Thread(target=during, args=(stop,)) if during else None
    started = time.perf_counter()
    for t in threads:
        t.start()
    if side:
        side.start()
    time.sleep(duration_s)
    stop.set()
    for t in threads + ([side] if side else []):
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "failed": len(failures), "failures": failures[:5],
            "p99_is_the_max": len(latencies) < 100,  # under 100 samples the p99 is the slowest request
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 4),
            "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_latency_s": round(_percentile(latencies, 0.99), 3) if latencies else None,
            "adapters": adapters}


def _percentile(sorted_values: list, q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def _summary(values: list) -> dict:
    values = sorted(values)
    return {"median": round(statistics.median(values), 4), "p99": round(_percentile(values, 0.99), 4),
            "max": round(values[-1], 4)}
