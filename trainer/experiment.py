"""`alignloop experiment [--quick] --out DIR`: the closed loop, measured end to end with no hand-offs.

    1. Serve     a Kafka broker and `alignloop serve` on the bundled shapes-world model, both started here and
                 both stopped at the end; everything the run writes is under DIR (DIR/home is the service's and
                 the nightly job's ALIGNLOOP_HOME: registry, images, snapshots, nightly state)
    2. Traffic   simulated users over HTTP, the browser's contract: POST /generate with a seen prompt, then a
                 thumbs vote through POST /feedback on each shown image (with probability vote_rate), the vote the
                 simulated rater's (the oracle's verdict, flipped with probability flip). Each user is its own
                 identity (the service trusts the X-Experiment-User header, as behind an authenticating proxy),
                 so arms are sticky per user and the per-identity rate limits stay on.
    3. Cycles    after requests_per_cycle requests: the nightly job (snapshot, reward model, fine-tune from the
                 live adapter, evaluate, publish, canary); then traffic goes on while the guardrail looks every
                 guardrail_every requests, until it promotes or rolls back the candidate, or canary_requests are
                 spent (the canary is then retired as inconclusive). The next cycle starts from what is live.
    4. Measure   on seen and unseen prompts, with world eval's seeds, per category: the base generator; best-k of
                 n by the CLIP score and by the learned reward (the live head, else the newest one the cycles
                 trained); each fine-tuning method's adapter trained from cycle 1's snapshot; the candidate of each
                 cycle and the generator live after it, alone and as served (its best k of n by the reward live
                 after that cycle: a head, else the CLIP score); the reward model's preference accuracy against
                 the CLIP score's on unseen pairs; fidelity and diversity
    5. Report    DIR/experiment.json, DIR/report.md with its PNG plots and image grids (alignloop.trainer.
                 experiment_report)

Exit status 0 when the run's checks hold (`checks`): no failed request, every vote accepted reached the topic, every
cycle ran the nightly job, no promotion the oracle rates worse than what it replaced, and (the smoke test's loose
check) the generator as served after the last cycle passes seen prompts better than the base alone.
"""

import base64
import io
import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from alignloop.trainer.config import ExperimentConfig

IDENTITY_HEADER = "X-Experiment-User"
SPLITS = ("seen", "unseen")
CATEGORY_KEYS = ("count", "color", "background", "combination")


# -------------------------------------------------------------------------------------------------
# Traffic: simulated users over HTTP
# -------------------------------------------------------------------------------------------------

class TrafficError(RuntimeError):
    """A request the service should have answered failed; the message names it."""


class Traffic:
    """Simulated users: `clients` threads, each request from one of `users` identities with a seen prompt, a vote
    on each shown image with probability vote_rate. Every vote is kept in `votes` (time, phase, arm, adapter,
    vote, the oracle's verdict), every failure in `failures`."""

    def __init__(self, url: str, config: ExperimentConfig):
        from alignloop.world.grammar import split

        self.url, self.config = url, config
        self.prompts = list(split("seen"))
        self.votes: list[dict] = []
        self.requests: list[dict] = []
        self.failures: list[dict] = []
        self.shed = 0  # 429/503 answers with Retry-After, retried after it
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._drawn = 0  # requests drawn so far (their index seeds the user, the prompt and the votes)

    def run(self, requests: int, phase: str) -> None:
        """Send `requests` requests (spread over the clients) and return when all are answered."""
        budget = {"left": requests}

        def client() -> None:
            import requests as http

            session = http.Session()
            while True:
                with self._lock:
                    if budget["left"] <= 0:
                        return
                    budget["left"] -= 1
                    index = self._drawn
                    self._drawn += 1
                self._one(session, index, phase)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(self.config.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _one(self, session, index: int, phase: str) -> None:
        from PIL import Image

        from alignloop.world.oracle import judge
        from alignloop.world.rater import SimulatedRater

        rng = random.Random(self.config.seed * 1_000_003 + index)
        user = f"sim-user-{rng.randrange(self.config.users)}"
        prompt = rng.choice(self.prompts)
        body = {"prompt": prompt.text, "n": self.config.n, "k": self.config.k, "steps": self.config.steps,
                "guidance": self.config.guidance, "seed": rng.randrange(2**31)}
        response = self._post(session, "/generate", body, user)
        if response is None:
            return
        answer = response.json()
        with self._lock:
            self.requests.append({"t": self.now(), "phase": phase, "arm": answer["arm"], "adapter": answer["adapter"],
                                  "reward_model": answer["reward_model"]})
        rater = SimulatedRater(flip=self.config.flip, seed=rng.randrange(2**31))
        for shown in answer["images"]:
            if rng.random() >= self.config.vote_rate:
                continue
            with Image.open(io.BytesIO(base64.b64decode(shown["image"]))) as png:
                image = np.asarray(png.convert("RGB"))
            passed = judge(image, prompt).passed
            vote = rater.vote_on(passed, prompt.category)
            if self._post(session, "/feedback", {"feedback_token": shown["feedback_token"], "vote": vote}, user) is None:
                continue
            with self._lock:
                self.votes.append({"t": self.now(), "phase": phase, "arm": answer["arm"],
                                   "adapter": answer["adapter"], "vote": vote, "passed": bool(passed),
                                   "category": prompt.category})

    def _post(self, session, route: str, body: dict, user: str, attempts: int = 20):
        """The response when 2xx; None after recording a failure. 429/503 are waited out (Retry-After)."""
        import requests as http

        for _ in range(attempts):
            try:
                response = session.post(self.url + route, json=body, headers={IDENTITY_HEADER: user}, timeout=600)
            except http.RequestException as err:
                self._fail(route, f"connection: {type(err).__name__}: {err}")
                return None
            if response.status_code in (429, 503) and "Retry-After" in response.headers:
                with self._lock:
                    self.shed += 1
                time.sleep(min(float(response.headers["Retry-After"]), 30.0))
                continue
            if 200 <= response.status_code < 300:
                return response
            self._fail(route, f"status {response.status_code}: {response.text[:300]}")
            return None
        self._fail(route, f"still shed after {attempts} attempts")
        return None

    def _fail(self, route: str, kind: str) -> None:
        with self._lock:
            self.failures.append({"t": self.now(), "route": route, "kind": kind})

    def now(self) -> float:
        """Seconds since the traffic started (the time axis of every record)."""
        return round(time.monotonic() - self.started, 2)

    def thumbs_up_rates(self, phase: str) -> dict:
        """{arm/adapter: {votes, up_rate, oracle_pass_rate}} of one phase's votes."""
        groups: dict = {}
        for vote in self.votes:
            if vote["phase"] == phase:
                groups.setdefault(f"{vote['arm']} {vote['adapter']}", []).append(vote)
        return {name: {"votes": len(rows), "up_rate": round(float(np.mean([r["vote"] == "up" for r in rows])), 4),
                       "oracle_pass_rate": round(float(np.mean([r["passed"] for r in rows])), 4)}
                for name, rows in sorted(groups.items())}


# -------------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------------

def run_experiment(config: ExperimentConfig, out: Path, quick: bool = False, progress: bool = True,
                   log: Callable = print) -> dict:
    """The whole experiment (module docstring); returns experiment.json's content. The caller's ALIGNLOOP_HOME
    must be out/home (the CLI sets it), so that this process, the service and the nightly job share one home."""
    from alignloop.feedback import broker
    from alignloop.feedback.config import TopicSettings, Topics
    from alignloop.machine import describe_machine
    from alignloop.serving.local import start_server

    out = Path(out)
    home = out / "home"
    started = time.monotonic()
    prefix = f"experiment-{uuid.uuid4().hex[:8]}."
    topics = Topics().prefixed(prefix)
    report = {"experiment": "closed loop", "quick": quick, "seed": config.seed, "config": config.to_dict(),
              "machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cycles": []}
    log(f"experiment: Kafka and the service under {home}")
    cluster = broker.up(port=broker.free_port(), controller_port=broker.free_port(), path=out / "kafka",
                        heap="512m", topics=None)
    try:
        broker.create_topics(cluster.bootstrap, topics, TopicSettings())
        server = start_server(home, {"ALIGNLOOP_SERVE_KAFKA_BOOTSTRAP": cluster.bootstrap,
                                     "ALIGNLOOP_SERVE_TOPIC_PREFIX": prefix,
                                     "ALIGNLOOP_SERVE_IDENTITY_HEADER": IDENTITY_HEADER})
        try:
            traffic = Traffic(server.url, config)
            for cycle in range(1, config.cycles + 1):
                report["cycles"].append(run_cycle(cycle, config, traffic, home, cluster.bootstrap, prefix, progress,
                                                  log))
            report["traffic"] = {"requests": len(traffic.requests), "votes": len(traffic.votes),
                                 "failures": traffic.failures, "shed_and_retried": traffic.shed,
                                 "seconds": round(time.monotonic() - traffic.started, 1)}
            (out / "traffic.json").write_text(json.dumps({"requests": traffic.requests, "votes": traffic.votes}))
        finally:
            server.stop()  # graceful: its producers flush before the topic is counted
            server.keep_log(out / "serve.log")
        report["traffic"]["feedback_events_on_topic"] = len(broker.read_topic(cluster.bootstrap, topics.feedback))
    finally:
        cluster.stop()

    log("experiment: measuring every generator and reward on seen and unseen prompts")
    report.update(measure_all(config, home, report["cycles"], out, progress, log))
    report["checks"] = checks(report)
    report["goals"] = goals(report)
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "experiment.json").write_text(json.dumps(report, indent=1))
    from alignloop.trainer.experiment_report import write_report

    write_report(report, out)
    return report


def run_cycle(cycle: int, config: ExperimentConfig, traffic: Traffic, home: Path, bootstrap: str, prefix: str,
              progress: bool, log: Callable) -> dict:
    """A day's traffic, the nightly job, then traffic while the guardrail decides on its canary."""
    from alignloop.feedback.config import Topics
    from alignloop.guardrail import Guardrail, GuardrailConfig
    from alignloop.registry import Registry
    from alignloop.rollout import current_rollout, rollback
    from alignloop.trainer.nightly import run_nightly

    registry = Registry(home / "registry")
    live_before = _live_adapter(registry)
    phase = f"cycle{cycle}"
    t0 = time.monotonic()
    log(f"cycle {cycle}: {config.requests_per_cycle} requests of traffic (live adapter: {live_before})")
    traffic.run(config.requests_per_cycle, phase)
    result = {"cycle": cycle, "live_before": live_before, "traffic_seconds": round(time.monotonic() - t0, 1),
              "thumbs": traffic.thumbs_up_rates(phase)}

    t0 = time.monotonic()
    state = run_nightly(nightly_config(config), home_dir=home, registry_url=str(home / "registry"), bootstrap=bootstrap,
                        images_url=(home / "images").as_uri(), topic_prefix=prefix, progress=progress, log=log)
    result.update(nightly_seconds=round(time.monotonic() - t0, 1), nightly_outcome=state.get("outcome"),
                  nightly_run=state["run_id"], nightly_folder=str(home / "nightly" / "runs" / state["run_id"]),
                  nightly_stages={k: _brief_stage(v) for k, v in state["stages"].items()})
    result["candidate"] = (state["stages"].get("publish") or {}).get("version")
    result["reward_version"] = (state["stages"].get("reward") or {}).get("version")
    result["reward_state"] = (state["stages"].get("reward") or {}).get("state")

    decisions = []
    if state.get("outcome") == "canary":
        guard = Guardrail(registry, bootstrap, Topics().prefixed(prefix),
                          GuardrailConfig(min_votes=config.guardrail_min_votes, poll_s=1.0))
        try:
            spent, t0 = 0, time.monotonic()
            while spent < config.canary_requests:
                chunk = min(config.guardrail_every, config.canary_requests - spent)
                traffic.run(chunk, f"{phase}-canary")
                spent += chunk
                decision = guard.step()
                record = {"t": traffic.now(), "requests": spent, **(guard.last_record or {})}
                decisions.append(record)
                log(f"cycle {cycle}: guardrail after {spent} canary requests: {record.get('action')}: "
                    f"{record.get('reason')}")
                if decision is None or decision.action != "none":
                    break
            else:
                rollout = current_rollout(registry)
                rollback(registry, who="experiment", why=f"inconclusive: the guardrail had not decided after "
                                                         f"{spent} requests (the experiment's canary budget)",
                         expect_rollout=rollout.id)
                decisions.append({"t": traffic.now(), "requests": spent, "action": "retired",
                                  "reason": "canary budget spent without a decision"})
                log(f"cycle {cycle}: canary retired, undecided after {spent} requests")
        finally:
            guard.close()
        result["canary_seconds"] = round(time.monotonic() - t0, 1)
        result["canary_thumbs"] = traffic.thumbs_up_rates(f"{phase}-canary")
    result["guardrail"] = decisions
    result["live_after"] = _live_adapter(registry)
    result["promoted"] = result["live_after"] != live_before
    return result


def nightly_config(config: ExperimentConfig):
    """The nightly job's config in every cycle."""
    from alignloop.trainer.config import NightlyConfig

    return NightlyConfig(method=config.method, steps=config.method_steps, canary_share=config.canary_share,
                         eval_prompts=config.nightly_eval_prompts)


def _live_adapter(registry) -> str:
    live = registry.live("adapter")
    return live.version if live else "base"


def _brief_stage(result: dict) -> dict:
    """A stage's result without its bulky parts (the full state stays in the nightly run's folder)."""
    return {k: _brief_stage(v) if isinstance(v, dict) else v for k, v in result.items()
            if k not in ("data", "rollout_arms", "seen_passed")}


# -------------------------------------------------------------------------------------------------
# Measurement
# -------------------------------------------------------------------------------------------------

def measure_all(config: ExperimentConfig, home: Path, cycles: list, out: Path, progress: bool, log: Callable) -> dict:
    """Every row of the report, seen and unseen: {split: {row: {overall, count, color, background,
    combination}}}, with fidelity, diversity, reward accuracy, grids and the other methods' runs."""
    import torch

    from alignloop.models import load_clip, load_generator
    from alignloop.registry import Registry
    from alignloop.rewards import get_reward
    from alignloop.trainer.finetune_job import adapter_active
    from alignloop.trainer.reward_model import REWARD_KIND

    registry = Registry(home / "registry")
    pipe = load_generator(device="cpu", dtype=torch.float32)
    clip = load_clip(device="cpu")
    from alignloop.rewards.functions import head_from_registry
    from alignloop.rewards.scorer import load_head_for

    live_reward = registry.live(REWARD_KIND)
    # rejection_reward ranks by the live head, else by the newest head the cycles trained (a candidate the gate
    # held back): the learned reward is measured either way. Served rows rank only by what serving ranked by after
    # their cycle: the head live then (the newest cycle's head its gate published live), else the CLIP score.
    ranked_by = live_reward.version if live_reward else next(
        (c["reward_version"] for c in reversed(cycles) if c["reward_version"]), None)
    served_by = serving_rankers(cycles)
    rewards = {"clip": get_reward("clip", clip=clip)}  # by name: "clip" or a head's version
    for version in {ranked_by, *served_by.values()} - {None, "clip"}:
        path, _ = head_from_registry(str(home / "registry"), version)
        rewards[version] = get_reward("learned", head=load_head_for(path, clip), clip=clip)
    result = {split: {} for split in SPLITS}
    result.update(fidelity={split: {} for split in SPLITS}, diversity={split: {} for split in SPLITS},
                  reward_model={"live": live_reward.version if live_reward else None,
                                "rejection_reward": ranked_by,
                                "per_cycle": [{"cycle": c["cycle"], "version": c["reward_version"],
                                               "state": c["reward_state"],
                                               **_reward_metrics(registry, c["reward_version"])} for c in cycles]})
    grids = {}
    row_of_adapter = {}  # adapter version -> the row it was measured as

    def measure(row: str, adapter: str, served: Optional[dict] = None) -> None:
        """The generator with `adapter` alone as `row`; with `served` ({row name: reward name}) also its best k of
        n by each reward. An adapter already measured is not measured again when no served row is asked for: `row`
        gets its figures."""
        served = {name: rewards[r] for name, r in (served or {}).items() if r in rewards}
        if adapter in row_of_adapter and not served:
            alias(row, row_of_adapter[adapter])
            return
        row_of_adapter.setdefault(adapter, row)
        with adapter_active(pipe, adapter, registry):
            for split in SPLITS:
                per_prompt = config.served_per_prompt if served else config.eval_per_prompt
                measured = measure_split(pipe, clip, split, per_prompt, config, served, progress)
                result[split][row] = measured["alone"]
                result["fidelity"][split][row] = measured["fidelity_fd"]
                result["diversity"][split][row] = measured["diversity"]
                result[split].update(measured["best_k"])
                if row == "base" and split == "unseen":
                    result["preference_accuracy_unseen"] = measured["preference_accuracy"]
                grids.setdefault(row, {})[split] = measured["grid"]
        log(f"measured {row}: seen {result['seen'][row]['overall']:.3f}, unseen {result['unseen'][row]['overall']:.3f}")

    def alias(row: str, same_as: str) -> None:
        """A row that is another's generator (the same adapter): its figures, not measured twice."""
        for split in SPLITS:
            result[split][row] = result[split][same_as]
            for table in ("fidelity", "diversity"):
                if same_as in result[table][split]:
                    result[table][split][row] = result[table][split][same_as]

    measure("base", "base", served={"rejection_clip": "clip", "rejection_reward": ranked_by})
    served_row = {("base", "clip"): "rejection_clip", ("base", ranked_by): "rejection_reward"}  # what measured what
    for cycle in cycles:
        c = cycle["cycle"]
        live_after = (cycle["live_after"], served_by[c])  # the generator and what serving ranked by
        if live_after in served_row:  # measured already (e.g. nothing promoted): the same rows
            measure(f"cycle{c}", cycle["live_after"])
            alias(f"served_cycle{c}", served_row[live_after])
        else:
            measure(f"cycle{c}", cycle["live_after"], served={f"served_cycle{c}": served_by[c]})
            served_row[live_after] = f"served_cycle{c}"
        if cycle["candidate"]:
            measure(f"candidate{c}", cycle["candidate"])
    result["methods"] = train_other_methods(config, cycles, home, out, progress, log)
    for method, run in result["methods"].items():
        measure(method, run["version"])
    result["promotions"] = promotion_checks(result, cycles)
    result["grids"] = _write_grids(grids, out)
    return result


def serving_rankers(cycles: list) -> dict:
    """{cycle: what serving ranked by after it}: the head of the newest cycle up to it whose gate published it live,
    else "clip" (the experiment starts with no head live)."""
    ranker, out = "clip", {}
    for cycle in cycles:
        if cycle["reward_state"] == "live" and cycle["reward_version"]:
            ranker = cycle["reward_version"]
        out[cycle["cycle"]] = ranker
    return out


def measure_split(pipe, clip, split: str, per_prompt: int, config: ExperimentConfig, rewards: dict,
                  progress: bool) -> dict:
    """The pipeline's images of a split's prompts (world eval's seeds): the pass rates of the first
    eval_per_prompt of each prompt (the generator alone) and of the best served_k of per_prompt by each reward."""
    from alignloop.kernels import grouped_topk
    from alignloop.trainer.finetune_eval import image_metrics
    from alignloop.trainer.reward_model import preference_accuracy
    from alignloop.world.evaluate import draw_split_images, summarize
    from alignloop.world.oracle import judge

    prompts, _, images = draw_split_images(pipe, split, per_prompt, config.steps, config.guidance, config.seed,
                                           max_prompts=config.eval_prompts, progress=progress)
    verdicts = [judge(image, prompt) for image, prompt in zip(images, prompts)]
    groups = len(prompts) // per_prompt
    alone = np.arange(len(prompts)).reshape(groups, per_prompt)[:, :config.eval_per_prompt].reshape(-1)
    metrics = image_metrics(clip, split, [prompts[i] for i in alone], images[alone], [verdicts[i] for i in alone],
                            config.eval_per_prompt, config.seed)
    measured = {"alone": category_rates(metrics), "fidelity_fd": metrics["fidelity_fd"],
                "diversity": metrics["diversity"], "best_k": {}, "grid": images[alone][:8 * config.eval_per_prompt]}
    passed = np.array([v.passed for v in verdicts]).astype(int)
    measured["preference_accuracy"] = {}  # over (passing, failing) image pairs of one prompt, by reward row
    for name, reward in rewards.items():
        scores = reward(images, [p.text for p in prompts])[0].float()
        _, top = grouped_topk(scores, per_prompt, config.served_k)
        chosen = (np.arange(groups)[:, None] * per_prompt + top.numpy()).reshape(-1)
        measured["best_k"][name] = category_rates(summarize([prompts[i] for i in chosen], [verdicts[i] for i in chosen]))
        accuracy, pairs = preference_accuracy(scores.numpy(), np.repeat(np.arange(groups), per_prompt), passed)
        measured["preference_accuracy"][name] = {"accuracy": None if accuracy is None else round(accuracy, 4),
                                                 "pairs": pairs}
    return measured


def category_rates(summary: dict) -> dict:
    """{overall, count, color, background, combination} from world.evaluate.summarize (None: no such prompt)."""
    return {"overall": summary["overall"], **{c: summary["categories"].get(c) for c in CATEGORY_KEYS}}


def _reward_metrics(registry, version: Optional[str]) -> dict:
    if not version:
        return {}
    from alignloop.trainer.reward_model import REWARD_KIND

    metrics = registry.get(REWARD_KIND, version).metrics
    return {k: metrics.get(k) for k in ("held_out_accuracy", "clip_score_accuracy", "held_out_pairs")}


def train_other_methods(config: ExperimentConfig, cycles: list, home: Path, out: Path, progress: bool,
                        log: Callable) -> dict:
    """Every method, from the base, on cycle 1's snapshot and the reward model live now (the report's per-method
    rows), each published as a candidate (never rolled out), so that the rows compare the methods on one footing.
    Cycle 1's candidate stands for its method when it is the same run (cycle1_candidate_if_same_run), not trained
    twice."""
    from alignloop.registry import Registry
    from alignloop.trainer.config import METHOD_CONFIGS, NEEDS_LIVE_REWARD
    from alignloop.trainer.finetune_job import finetune_from_snapshot
    from alignloop.trainer.reward_model import REWARD_KIND

    if not config.other_methods:
        return {}
    snapshot = (cycles[0]["nightly_stages"].get("snapshot") or {}).get("folder")
    if not snapshot:
        return {}
    registry = Registry(home / "registry")
    runs = {}
    for method, config_class in METHOD_CONFIGS.items():
        if method in NEEDS_LIVE_REWARD and registry.live(REWARD_KIND) is None:
            log(f"{method}: no reward model is live, it optimizes the CLIP score")
        fields = {"seed": config.seed, **({"steps": config.other_method_steps} if config.other_method_steps else {})}
        method_config = config_class(**fields)
        same = cycle1_candidate_if_same_run(method, method_config, config, cycles[0])
        if same:
            log(f"{method}: cycle 1's candidate {same} is this run (the same method, config and snapshot, from the "
                f"base): not trained again")
            runs[method] = {"version": same, "seconds": 0.0, "same_as": "candidate1",
                            "metrics_jsonl": str(Path(cycles[0]["nightly_folder"]) / "finetune" / "metrics.jsonl")}
            continue
        t0 = time.monotonic()
        report = finetune_from_snapshot(method, Path(snapshot), method_config, out=out / "methods" / method,
                                        registry=str(home / "registry"), eval_prompts=1,
                                        progress=progress, log=log)
        runs[method] = {"version": report["published"], "seconds": round(time.monotonic() - t0, 1),
                        "metrics_jsonl": str(out / "methods" / method / "metrics.jsonl")}
    return runs


def cycle1_candidate_if_same_run(method: str, method_config, config: ExperimentConfig, cycle: dict) -> Optional[str]:
    """Cycle 1's candidate when its nightly fine-tune is the run `method_config` would make: the same method and
    config, from the base, on the same snapshot (training is seeded, so the adapter would be the same); else None."""
    from alignloop.trainer.nightly import method_config_for

    tuned = cycle["nightly_stages"].get("finetune") or {}
    if not cycle.get("candidate") or tuned.get("method") != method or tuned.get("init_adapter"):
        return None
    return cycle["candidate"] if method_config_for(nightly_config(config), "", method) == method_config else None


def promotion_checks(result: dict, cycles: list) -> list:
    """Each promotion: the oracle's seen and unseen pass rates of the promoted adapter and of the one it replaced."""
    checked = []
    for cycle in cycles:
        if not cycle["promoted"]:
            continue
        c = cycle["cycle"]
        before = "base" if c == 1 else f"cycle{c - 1}"
        checked.append({"cycle": c, "promoted": cycle["live_after"], "replaced": cycle["live_before"],
                        **{f"{split}_pass": result[split][f"cycle{c}"]["overall"] for split in SPLITS},
                        **{f"replaced_{split}_pass": result[split][before]["overall"] for split in SPLITS},
                        "worse": result["seen"][f"cycle{c}"]["overall"] < result["seen"][before]["overall"]})
    return checked


def _write_grids(grids: dict, out: Path) -> dict:
    """grid-base-vs-<row>.png for each measured row: the same seeds, base rows above the row's."""
    from alignloop.trainer.finetune_eval import image_grid

    written = {}
    base = grids.get("base", {}).get("unseen")
    for row, splits in grids.items():
        if row == "base" or base is None or "unseen" not in splits:
            continue
        per_row = min(8, len(base))
        pairs = []
        for start in range(0, min(len(base), len(splits["unseen"])), per_row):
            pairs += [base[start:start + per_row], splits["unseen"][start:start + per_row]]
        path = out / f"grid-base-vs-{row}.png"
        image_grid(pairs, path)
        written[row] = path.name
    return written


# -------------------------------------------------------------------------------------------------
# Verdicts
# -------------------------------------------------------------------------------------------------

def checks(report: dict) -> dict:
    """What every run must show (the exit status): a loop that ran and moved the pass rate up, losing nothing."""
    traffic = report["traffic"]
    last = report["cycles"][-1]["cycle"]
    return {
        "no_failed_request": not traffic["failures"],
        "votes_accepted=events_on_topic": traffic["votes"] == traffic["feedback_events_on_topic"],
        "every_cycle_ran_the_nightly_job": all(c["nightly_outcome"] for c in report["cycles"]),
        "no_promotion_rated_worse_by_the_oracle": not any(p["worse"] for p in report["promotions"]),
        # Loose (the smoke test's): as served after the last cycle beats the base generator alone on seen prompts
        "served_beats_base_on_seen": report["seen"][f"served_cycle{last}"]["overall"] > report["seen"]["base"]["overall"],
    }


def goals(report: dict) -> dict:
    """The issue's goals for the full run, on unseen prompts, measured (never the exit status)."""
    last = report["cycles"][-1]["cycle"]
    base = report["unseen"]["base"]["overall"]
    live, served = report["unseen"][f"cycle{last}"]["overall"], report["unseen"][f"served_cycle{last}"]["overall"]
    return {"live_minus_base_unseen": round(live - base, 4), "live_goal": 0.15, "live_met": live - base >= 0.15,
            "served_minus_base_unseen": round(served - base, 4), "served_goal": 0.30,
            "served_met": served - base >= 0.30}
