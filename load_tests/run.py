"""Load scenarios against a locally served instance: Kafka and `alignloop serve` on the bundled shapes-world model,
simulated users from load_tests/locustfile.py run headless, and one JSON report per run.

    python load_tests/run.py mix --out /tmp/load/mix          # the realistic mix, 4 users, 5 minutes
    python load_tests/run.py burst --out /tmp/load/burst      # feedback only, 32 users voting back to back
    python load_tests/run.py swap --out /tmp/load/swap        # the mix while the live adapter is promoted every 20 s
    python load_tests/run.py overload --out /tmp/load/over    # the mix with 4x the users the machine holds
    python load_tests/run.py soak --out /tmp/load/soak        # the mix for 30 minutes: memory growth per hour
    python load_tests/run.py cold-start --out /tmp/load/cold  # 10 fresh servers, each hit by 8 clients at once

`--users`, `--seconds`, `--steps` and the mix's knobs override a scenario's defaults. Each simulated user has its own
identity (the service is started trusting the X-Load-User header, as behind an authenticating proxy), so the
per-identity rate limits stay on as in production. Under --out: report.json (the verdict first), the locust CSVs
(locust_stats.csv, ...), locust.log, and home/ (the service's ALIGNLOOP_HOME with serve.log, its images and the
snapshot). Exit status 0 when every check of the scenario holds, 1 otherwise.

What report.json holds: requests per second, p50/p95/p99 by endpoint (successful requests), errors by kind
("shed: 503 queue_full" is load shed with Retry-After; anything else is a failure), resident memory of the service's
processes and of the broker (first, peak, last, growth per hour fitted over the second half), the votes the users saw
accepted vs feedback events on the topic vs rows of the snapshot cut afterwards, and the machine.
"""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
IDENTITY_HEADER = "X-Load-User"


@dataclass(frozen=True)
class Scenario:
    about: str
    user_class: str = "MixUser"
    users: int = 4  # what this 2-core machine serves without shedding at n 4..16, 20 steps (load_tests/README.md)
    seconds: int = 300
    serve_env: dict = field(default_factory=dict)  # ALIGNLOOP_SERVE_* for the service
    promote_every_s: float = 0.0  # > 0: promote a fresh adapter this often while the users run
    shed_ok: bool = False  # load shed with Retry-After (429/503) is the expected answer, not a failure
    cold_starts: int = 0  # > 0: no locust; this many fresh servers, each hit by `users` clients the moment it is ready


SCENARIOS = {
    "mix": Scenario("the realistic mix: generate (n 4..16), look, thumb some images, repeat"),
    "burst": Scenario("feedback only: 32 users each voting on 32 tokens back to back", user_class="FeedbackBurstUser",
                      users=32, seconds=180),
    "swap": Scenario("the mix while the live adapter is promoted every 20 s", seconds=240, promote_every_s=20.0),
    # 4x the users of the mix. The generation queue is bounded to what this CPU samples in about 20 s (64 images at
    # 20 steps), so overload is answered with 503 at once instead of minutes of queueing.
    "overload": Scenario("beyond capacity: 4x the mix's users", users=16, seconds=180, shed_ok=True,
                         serve_env={"ALIGNLOOP_SERVE_MAX_QUEUED_IMAGES": "64"}),
    "soak": Scenario("the mix for 30 minutes: memory growth per hour", seconds=1800),
    # The shape of the one HTTP 500 `bench serving` once returned (issue 14): a fresh server, batching off, a learned
    # head live, Kafka unreachable (events spool), 8 clients sending n=16 the moment /readyz answers. It happened once
    # per fresh server, not once per request, so this starts many servers.
    "cold-start": Scenario("fresh servers (batching off, Kafka unreachable) hit by 8 clients x 3 requests at once",
                           users=8, cold_starts=10),
}
SAMPLE_EVERY_S = 5.0
# Memory growth is fitted over the second half of a run: the worker's resident memory climbs for its first minutes
# (allocator pools filling for each new batch shape; 1.2 -> 1.8 GiB over 10 minutes of the mix, flat after), so a
# leak is judged only on what comes after MEMORY_WARMUP_S, and only in runs long enough to have that (the soak).
MEMORY_WARMUP_S = 600.0
MIN_SAMPLES_PER_HALF = 24  # 2 minutes at SAMPLE_EVERY_S


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("scenario", choices=sorted(SCENARIOS), help="; ".join(f"{k}: {s.about}" for k, s in
                                                                              SCENARIOS.items()))
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json, the CSVs and the logs")
    parser.add_argument("--users", type=int, help="simulated users (default: the scenario's)")
    parser.add_argument("--seconds", type=int, help="how long the users run (default: the scenario's)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per request (default 20)")
    parser.add_argument("--n-range", default="4-16", help="candidates per request, MIN-MAX (default 4-16)")
    parser.add_argument("--k-max", type=int, default=4, help="largest k asked for (default 4)")
    parser.add_argument("--ctr", type=float, default=0.5, help="chance that a user thumbs an image (default 0.5)")
    parser.add_argument("--think", default="1-4", help="seconds a user looks before voting, MIN-MAX (default 1-4)")
    parser.add_argument("--burst-tokens", type=int, default=32, help="burst: tokens each user votes on (default 32)")
    parser.add_argument("--promote-every-s", type=float, help="swap: seconds between promotions (default 20)")
    parser.add_argument("--starts", type=int, help="cold-start: fresh servers to start (default 10)")
    parser.add_argument("--no-batching", action="store_true", help="serve without cross-request batching")
    parser.add_argument("--bootstrap", help="use this running Kafka instead of starting one (topics get a fresh "
                                            "prefix either way)")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the server and the broker this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scenario = SCENARIOS[args.scenario]
    if args.promote_every_s is not None:
        if args.promote_every_s <= 0 or not scenario.promote_every_s:
            parser.error("--promote-every-s must be > 0, and only the swap scenario promotes")
        scenario = dataclasses.replace(scenario, promote_every_s=args.promote_every_s)
    n_min, n_max = (int(x) for x in args.n_range.split("-"))
    if not 1 <= n_min <= n_max <= 64 or not 1 <= args.k_max <= 64 or not 0 <= args.ctr <= 1:
        parser.error("need 1 <= n-min <= n-max <= 64, 1 <= k-max <= 64 and 0 <= ctr <= 1")
    users, seconds = args.users or scenario.users, args.seconds or scenario.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    knobs = {"N_MIN": n_min, "N_MAX": n_max, "K_MAX": args.k_max, "STEPS": args.steps, "CTR": args.ctr,
             "THINK": args.think, "BURST_TOKENS": args.burst_tokens}
    settings = {"scenario": args.scenario, "about": scenario.about, "users": users, "steps": args.steps}
    if scenario.cold_starts:
        settings.update(starts=args.starts or scenario.cold_starts, n=n_max, k=min(args.k_max, n_max),
                        requests_per_user=3, cross_request_batching=False, kafka="unreachable: events spool")
        report = run_cold_starts(args.out, settings["starts"], users, args.steps, n_max, settings["k"], settings)
    else:
        settings.update(seconds=seconds, knobs=knobs, cross_request_batching=not args.no_batching,
                        serve_env=scenario.serve_env, promote_every_s=scenario.promote_every_s)
        report = run(scenario, args.out, users, seconds, knobs, args.no_batching, args.bootstrap, settings)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"passed": report["passed"], "checks": report["checks"], "report": str(args.out / "report.json")}))
    return 0 if report["passed"] else 1


def run(scenario: Scenario, out: Path, users: int, seconds: int, knobs: dict, no_batching: bool,
        bootstrap: str | None, settings: dict) -> dict:
    from alignloop.feedback import broker
    from alignloop.feedback.config import TopicSettings, Topics
    from alignloop.machine import describe_machine
    from alignloop.serving.bench_swap import rollout_switches
    from alignloop.serving.local import start_server

    home = out / "home"
    prefix = f"load-{uuid.uuid4().hex[:8]}."
    topics = Topics().prefixed(prefix)
    cluster = None
    if bootstrap is None:
        cluster = broker.up(port=broker.free_port(), controller_port=broker.free_port(), path=out / "kafka",
                            heap="512m", topics=None)
        bootstrap = cluster.bootstrap
    try:
        broker.create_topics(bootstrap, topics, TopicSettings())
        adapters = _publish_adapters(home, scenario, seconds) if scenario.promote_every_s else []
        serve_env = {"ALIGNLOOP_SERVE_KAFKA_BOOTSTRAP": bootstrap, "ALIGNLOOP_SERVE_TOPIC_PREFIX": prefix,
                     "ALIGNLOOP_SERVE_IDENTITY_HEADER": IDENTITY_HEADER,
                     "ALIGNLOOP_SERVE_CROSS_REQUEST_BATCHING": "0" if no_batching else "1", **scenario.serve_env}
        server = start_server(home, serve_env)
        try:
            memory = _MemorySampler(server, cluster)
            memory.start()
            promoter = _Promoter(home, adapters, scenario.promote_every_s) if adapters else None
            if promoter:
                promoter.start()
            locust = _run_locust(scenario.user_class, server.url, users, seconds, knobs, out)
            if promoter:
                promoter.stop()
            healthy_after = _healthy(server.url) if scenario.shed_ok else None
            memory.stop()
            switches = rollout_switches(server.url) if adapters else None
        finally:
            server.stop()  # graceful: the workers flush their producers before the count below
        events_on_topic = len(broker.read_topic(bootstrap, topics.feedback))
        snapshot = _snapshot(home, bootstrap, topics)
    finally:
        if cluster is not None:
            cluster.stop()

    votes_accepted = locust["report"].get("votes", {}).get("accepted", 0)
    errors = locust["report"].get("errors", [])
    failures = [e for e in errors if not (scenario.shed_ok and e["kind"].startswith("shed:"))]
    checks = {
        "locust_ran": locust["returncode"] is not None and bool(locust["report"].get("endpoints")),
        "no_failed_request": not failures,
        "votes_accepted=events_on_topic": votes_accepted == events_on_topic,
        "events_on_topic=snapshot_feedback_rows": events_on_topic == snapshot["feedback_rows"],
        "every_vote_joined_its_generation": snapshot["votes_rows"] == snapshot["feedback_rows"],
    }
    if scenario.shed_ok:
        checks["healthy_after"] = bool(healthy_after and healthy_after["ok"])
    if (memory_bounded := memory.bounded()) is not None:
        checks["memory_bounded_after_warmup"] = memory_bounded
    if scenario.promote_every_s:
        checks["requests_drawn_by_several_adapters"] = len(locust["report"].get("adapters", {})) >= 2
    report = {
        "passed": all(checks.values()), "checks": checks, "failures": failures, "settings": settings,
        "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "endpoints": locust["report"].get("endpoints", {}), "errors": errors, "wall_s": locust["report"].get("wall_s"),
        "votes": {"accepted": votes_accepted, "duplicates_answered": locust["report"].get("votes", {}).get("duplicate", 0),
                  "feedback_events_on_topic": events_on_topic, **snapshot},
        "memory": memory.summary(),
        "server_log": str(server.log_path), "locust_log": str(out / "locust.log"),
    }
    if healthy_after is not None:
        report["healthy_after"] = healthy_after
    if promoter:
        report["swaps"] = {"promotions": promoter.promoted, "worker_switches": switches, "errors": promoter.errors,
                           "requests_by_adapter": locust["report"].get("adapters", {})}
    return report


def run_cold_starts(out: Path, starts: int, clients: int, steps: int, n: int, k: int, settings: dict) -> dict:
    """`starts` fresh servers in turn (the bench's: batching off, a learned head live, Kafka unreachable); the moment
    each is ready, `clients` threads send 3 requests each at once. Any answer but 200 fails; the report names that
    server's log."""
    import requests

    from alignloop.machine import describe_machine
    from alignloop.serving.bench import BenchServer, bench_prompts, save_bench_head

    head = save_bench_head(out / "head.safetensors")
    prompts = bench_prompts(64)
    failures, latencies, failed_logs = [], [], []
    for start in range(starts):
        with BenchServer(out / f"cold-{start}", batching=False, steps=steps, head_path=head,
                         name=f"cold-start-{start}") as server:
            barrier = threading.Barrier(clients)

            def client(c: int) -> None:
                barrier.wait()
                for j in range(3):
                    body = {"prompt": prompts[(start * clients + c * 3 + j) % len(prompts)], "n": n, "k": k,
                            "steps": steps, "user_id": f"cold-{c}"}
                    began = time.perf_counter()
                    try:
                        response = requests.post(server.url + "/generate", json=body, timeout=600)
                    except requests.RequestException as err:
                        failures.append({"start": start, "kind": f"connection: {type(err).__name__}"})
                        continue
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - began)
                    else:
                        failures.append({"start": start, "kind": f"status {response.status_code}",
                                         "body": response.text[:300]})

            threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if any(f["start"] == start for f in failures):
            failed_logs.append(str(server.server.log_path))  # under --out: it stays
    checks = {"no_failed_request": not failures, "every_request_answered": len(latencies) + len(failures) ==
              starts * clients * 3}
    return {"passed": all(checks.values()), "checks": checks, "failures": failures, "settings": settings,
            "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "requests": starts * clients * 3, "succeeded": len(latencies),
            "p50_s": round(float(np.median(latencies)), 3) if latencies else None,
            "p99_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None, "failed_servers_logs": failed_logs}


def _run_locust(user_class: str, url: str, users: int, seconds: int, knobs: dict, out: Path) -> dict:
    locust = Path(sys.executable).with_name("locust")
    report_path = out / "locust-report.json"
    env = {**os.environ, **{f"ALIGNLOOP_LOAD_{k}": str(v) for k, v in knobs.items()},
           "ALIGNLOOP_LOAD_IDENTITY_HEADER": IDENTITY_HEADER, "ALIGNLOOP_LOAD_REPORT": str(report_path)}
    command = [str(locust), "-f", str(HERE / "locustfile.py"), user_class, "--headless", "-u", str(users),
               "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "300", "--host", url, "--only-summary",
               "--csv", str(out / "locust"), "--loglevel", "WARNING"]
    with open(out / "locust.log", "w") as log:
        returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=seconds + 900).returncode
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return {"returncode": returncode, "report": report}


class _MemorySampler(threading.Thread):
    """Resident memory (MiB) of the service's processes and the broker's, every SAMPLE_EVERY_S seconds."""

    def __init__(self, server, cluster):
        super().__init__(daemon=True)
        self.server, self.cluster = server, cluster
        self.samples: dict[str, list] = {}  # "worker 1234" -> [(seconds since start, MiB)]
        self._stop_event = threading.Event()
        self.started_at = time.monotonic()

    def run(self):
        import psutil

        while True:
            pids = {pid: f"{role} {pid}" for pid, role in self.server.pids().items()}
            if self.cluster is not None:
                pids.update({node.pid(): f"kafka {node.node_id}" for node in self.cluster.nodes if node.pid()})
            now = time.monotonic() - self.started_at
            for pid, name in pids.items():
                try:
                    self.samples.setdefault(name, []).append((now, psutil.Process(pid).memory_info().rss / 2**20))
                except psutil.NoSuchProcess:
                    pass
            if self._stop_event.wait(SAMPLE_EVERY_S):
                return

    def stop(self):
        self._stop_event.set()
        self.join()

    def summary(self) -> dict:
        out = {}
        for name, points in sorted(self.samples.items()):
            t, mib = (np.asarray(x) for x in zip(*points))
            late = t >= t[-1] / 2
            slope = float(np.polyfit(t[late], mib[late], 1)[0]) * 3600 if late.sum() >= 3 else None
            out[name] = {"first_mib": round(float(mib[0]), 1), "peak_mib": round(float(mib.max()), 1),
                         "last_mib": round(float(mib[-1]), 1), "samples": int(len(mib)),
                         "growth_mib_per_hour_second_half": round(slope, 1) if slope is not None else None,
                         "every_minute_mib": [round(float(m), 1) for m in mib[::max(1, int(60 / SAMPLE_EVERY_S))]]}
        return out

    def bounded(self) -> bool | None:
        """No process still growing after the warm-up: over the samples past MEMORY_WARMUP_S, the second half's peak
        within 10% of the first half's. None when the run was too short to tell warm-up from a leak."""
        if not self.samples:
            return None
        judged = None
        for points in self.samples.values():
            mib = [m for t, m in points if t >= MEMORY_WARMUP_S]
            if len(mib) < 2 * MIN_SAMPLES_PER_HALF:
                return None
            half = len(mib) // 2
            judged = max(mib[half:]) <= 1.10 * max(mib[:half])
            if not judged:
                return False
        return judged


class _Promoter(threading.Thread):
    """Promotes the next published adapter every `every_s` seconds (a hot swap in every worker)."""

    def __init__(self, home: Path, versions: list, every_s: float):
        super().__init__(daemon=True)
        self.home, self.versions, self.every_s = home, versions, every_s
        self.promoted, self.errors = 0, []
        self._stop_event = threading.Event()

    def run(self):
        from alignloop import rollout
        from alignloop.registry import Registry

        registry = Registry(self.home / "registry")
        for version in self.versions:
            if self._stop_event.wait(self.every_s):
                return
            try:
                rollout.promote(registry, version, "load test", "swap under load")
                self.promoted += 1
            except Exception as err:  # reported; the users' requests are the measurement
                self.errors.append(repr(err))

    def stop(self):
        self._stop_event.set()
        self.join()


def _publish_adapters(home: Path, scenario: Scenario, seconds: int) -> list:
    """Random LoRA adapters published as candidates, enough for one promotion every promote_every_s."""
    from alignloop import rollout
    from alignloop.adapters import base_model_identity
    from alignloop.models import load_generator
    from alignloop.registry import Registry
    from alignloop.serving.bench_swap import publish_random_adapter

    registry = Registry(home / "registry")
    unet = load_generator(device="cpu").unet
    identity = base_model_identity("shapes-sd-tiny")
    count = int(seconds // scenario.promote_every_s) + 1
    with tempfile.TemporaryDirectory() as tmp:
        versions = [publish_random_adapter(registry, unet, Path(tmp) / f"a{i}", seed=2000 + i, identity=identity)
                    for i in range(count + 1)]
    rollout.promote(registry, versions[0], "load test", "live before the service starts")
    return versions[1:]


def _healthy(url: str, timeout_s: float = 180) -> dict:
    """After the load: /readyz answers 200 and a small /generate succeeds, within timeout_s."""
    import requests

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if requests.get(url + "/readyz", timeout=10).status_code == 200:
                response = requests.post(url + "/generate", json={"prompt": "a red circle", "n": 4, "k": 1, "steps": 4},
                                         headers={IDENTITY_HEADER: "health-check"}, timeout=120)
                if response.status_code == 200:
                    return {"ok": True, "seconds": round(time.monotonic() - started, 1)}
        except requests.RequestException:
            pass
        time.sleep(2)
    return {"ok": False, "seconds": round(time.monotonic() - started, 1)}


def _snapshot(home: Path, bootstrap: str, topics) -> dict:
    """Cut a snapshot of both topics (the trainer's next input) and count its rows."""
    import pyarrow.parquet as pq

    from alignloop.feedback.image_store import ImageStore
    from alignloop.feedback.snapshot import SnapshotWriter

    writer = SnapshotWriter(home / "snapshots", bootstrap, ImageStore((home / "images").as_uri()), topics)
    try:
        version = writer.run(progress=False)
    finally:
        writer.close()
    if version is None:
        return {"snapshot": None, "feedback_rows": 0, "votes_rows": 0}
    return {"snapshot": str(version), "feedback_rows": pq.read_metadata(version / "feedback.parquet").num_rows,
            "votes_rows": pq.read_metadata(version / "votes.parquet").num_rows}


if __name__ == "__main__":
    sys.exit(main())
