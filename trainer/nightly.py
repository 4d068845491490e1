"""`alignloop nightly`: one turn of the loop, from the feedback topics to a canary, safe to kill and rerun.

    1. snapshot  consume both topics from the committed offsets into a new dataset version (feedback.snapshot)
    2. reward    train the reward model on it; its own gate publishes it live or keeps it a candidate
    3. finetune  tune the configured method (default: the fine-tuning benchmark's best) from the live adapter,
                 or from the base model when none is live, with the live reward model; with nproc_per_node > 1
                 as `alignloop train METHOD` under torchrun, a child process whose report this job reads back
    4. evaluate  the tuned adapter and its parent (the live adapter, or the base) on the same seen prompts and
                 seeds; unseen prompts are reported, never decided on (they measure, they do not select)
    5. publish   the adapter as a candidate, its manifest naming the run, the parent and both evaluations
    6. canary    open the rollout to `canary_share` of users, unless the candidate rated worse than its parent by
                 more than chance, prompt by prompt (seen_drop_verdict)

Every stage's result is written durably to <home>/nightly/runs/<run>/state.json when it is done. A run that
died is resumed at its first unfinished stage by the next `alignloop nightly` (or dropped with --abandon);
the stages that write to the registry first look for what this run already wrote there (its run id is in
the manifest's data), so a run killed anywhere publishes at most one reward model and one candidate. An
exclusive lock (flock, released by the kernel when the holder dies) keeps two runs from overlapping: the
second says who holds it and exits non-zero.
"""

import fcntl
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from alignloop.durable import write_durably
from alignloop.errors import UserFacingError
from alignloop.trainer.config import NightlyConfig

STAGES = ("snapshot", "reward", "finetune", "evaluate", "publish", "canary")
LOCKED_EXIT = 3  # the exit status when another run holds the lock


class NightlyLocked(UserFacingError):
    """Another nightly run holds the lock."""


# -------------------------------------------------------------------------------------------------
# The lock and the run's state
# -------------------------------------------------------------------------------------------------

class NightlyLock:
    """An exclusive, non-blocking flock on <folder>/lock; the holder's pid, host, run and start time in it."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "an unknown process"
            self._file.close()
            raise NightlyLocked(f"another nightly run holds {self.path}: {holder}") from None

    def name(self, run_id: str) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}, run {run_id}, since "
                         f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()


class RunState:
    """runs/<run_id>/state.json: the config and each finished stage's result, rewritten durably after each."""

    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = folder, data

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def done(self, stage: str) -> Optional[dict]:
        return self.data["stages"].get(stage)

    def finish_stage(self, stage: str, result: dict) -> None:
        self.data["stages"][stage] = result
        self.save()

    def end(self, outcome: str, reason: str) -> None:
        self.data.update(outcome=outcome, reason=reason, ended=time.time())
        self.save()

    def save(self) -> None:
        write_durably(self.folder / "state.json", (json.dumps(self.data, indent=1) + "\n").encode())


def _runs(root: Path) -> list:
    """Every run's state, oldest first (run ids sort by start time)."""
    out = []
    for path in sorted((root / "runs").glob("*/state.json")):
        out.append(RunState(path.parent, json.loads(path.read_text())))
    return out


def open_run(root: Path, config: NightlyConfig, abandon: bool, log) -> RunState:
    """The unfinished run to resume (with the same config), or a new one; --abandon ends an unfinished one."""
    runs = _runs(root)
    unfinished = runs[-1] if runs and "outcome" not in runs[-1].data else None
    if unfinished is not None and abandon:
        unfinished.end("abandoned", "--abandon: dropped before finishing; what it published stays as it is")
        log(f"run {unfinished.run_id}: abandoned at stage "
            f"{next((s for s in STAGES if not unfinished.done(s)), 'end')}")
        unfinished = None
    if unfinished is not None:
        # A field added since the run started (e.g. worse_significance) takes its default
        if {**NightlyConfig().to_dict(), **unfinished.data["config"]} != config.to_dict():
            raise UserFacingError(f"run {unfinished.run_id} did not finish and was started with another config "
                                  f"({unfinished.data['config']}); rerun with that config to resume it, or pass "
                                  "--abandon to drop it")
        log(f"run {unfinished.run_id}: resuming at stage {next((s for s in STAGES if not unfinished.done(s)), 'end')}")
        return unfinished
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    while (root / "runs" / run_id).exists():  # two runs in one second (tests)
        run_id += "x"
    folder = root / "runs" / run_id
    folder.mkdir(parents=True)
    state = RunState(folder, {"run_id": run_id, "config": config.to_dict(), "started": time.time(), "stages": {}})
    state.save()
    log(f"run {run_id}: started")
    return state


def last_finished_snapshot(root: Path) -> Optional[dict]:
    """The snapshot stage of the newest run that finished with a candidate: the votes new since then are the ones no
    candidate was tuned on (a run that found too few is not a baseline, or a slow trickle would never count up)."""
    for state in reversed(_runs(root)):
        if state.data.get("outcome") in ("published", "canary") and state.done("snapshot"):
            return state.done("snapshot")
    return None


def _written_by(registry, kind: str, run_id: str):
    """The version this run already published of `kind`, if a kill came between the publish and the state."""
    for manifest in registry.versions(kind):
        if (manifest.data or {}).get("nightly_run") == run_id:
            return manifest
    return None


# -------------------------------------------------------------------------------------------------
# The job
# -------------------------------------------------------------------------------------------------

def run_nightly(config: NightlyConfig, home_dir: Optional[Path] = None, registry_url: Optional[str] = None,
                bootstrap: Optional[str] = None, images_url: Optional[str] = None, topic_prefix: str = "",
                abandon: bool = False,
                progress: bool = True, log: Callable = print, stop_after: Optional[str] = None) -> dict:
    """The whole job; returns the run's state. `stop_after` (tests, drills) ends the process's work after that
    stage as a kill would, leaving the run unfinished."""
    from alignloop.registry import Registry
    from alignloop.settings import home

    root = Path(home_dir or home()) / "nightly"
    lock = NightlyLock(root)
    try:
        state = open_run(root, config, abandon, log)
        lock.name(state.run_id)
        store = Registry(registry_url)
        stages = {"snapshot": lambda: stage_snapshot(root, config, bootstrap, images_url, topic_prefix,
                                                           progress),
                  "reward": lambda: stage_reward(state, store, registry_url, progress, log),
                  "finetune": lambda: stage_finetune(state, config, store, registry_url, progress, log),
                  "evaluate": lambda: stage_evaluate(state, config, store, progress),
                  "publish": lambda: stage_publish(state, config, store, log),
                  "canary": lambda: stage_canary(state, config, store, log)}
        for stage in STAGES:
            result = state.done(stage)
            ran = result is None
            if ran:
                started = time.monotonic()
                result = stages[stage]()
                result["seconds"] = round(time.monotonic() - started, 1)
                state.finish_stage(stage, result)
                log(f"run {state.run_id}: {stage} done in {result['seconds']} s: {_brief(result)}")
            if result.get("end"):  # also a finished stage's end that a kill kept from being recorded
                state.end(*result["end"])
                log(f"run {state.run_id}: {result['end'][0]}: {result['end'][1]}")
                return state.data
            if ran and stage == stop_after:
                return state.data
        state.end("canary", f"adapter {state.done('publish')['version']} serves {config.canary_share:.0%} of users")
        return state.data
    finally:
        lock.release()


def _brief(result: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("seconds", "end") and not isinstance(v, dict))


def stage_snapshot(root: Path, config: NightlyConfig, bootstrap, images_url, topic_prefix: str, progress: bool) -> dict:
    from alignloop.feedback.cli import _answering_bootstrap
    from alignloop.feedback.config import Topics
    from alignloop.feedback.image_store import ImageStore
    from alignloop.feedback.snapshot import SnapshotWriter

    writer = SnapshotWriter(root / "snapshots", _answering_bootstrap(bootstrap), ImageStore(images_url),
                            Topics().prefixed(topic_prefix), group_id=f"alignloop-nightly-{topic_prefix}")
    try:
        newest = writer.run(progress=progress)
    finally:
        writer.close()
    if newest is None:
        return {"version": None, "end": ("nothing new", "no events on the topics yet")}
    counts = json.loads((newest / "manifest.json").read_text())["counts"]
    result = {"folder": str(newest), "version": newest.name, "votes": counts["votes"], "images": counts["images"]}
    before = last_finished_snapshot(root)
    new_votes = counts["votes"] - (before or {}).get("votes", 0)
    if new_votes < config.min_new_votes or (before or {}).get("version") == newest.name:
        result["end"] = ("nothing new", f"{new_votes} new votes in snapshot {newest.name} (fewer than "
                                        f"{config.min_new_votes})")
    return result


def stage_reward(state: RunState, store, registry_url, progress: bool, log) -> dict:
    from alignloop.trainer.reward_model import REWARD_KIND, train_reward

    already = _written_by(store, REWARD_KIND, state.run_id)
    if already is not None:
        return {"version": already.version, "state": already.state, "reason": "published before a restart"}
    report = train_reward(Path(state.done("snapshot")["folder"]), out=state.folder / "reward", registry=registry_url,
                          progress=progress, log=log, extra_data={"nightly_run": state.run_id})
    return {"version": report["version"], "state": report["state"], "reason": report["reason"],
            "held_out_accuracy": report["metrics"].get("held_out_accuracy")}


def method_config_for(config: NightlyConfig, init_adapter: str, method: str = ""):
    from alignloop.trainer.config import METHOD_CONFIGS

    fields = {"init_adapter": init_adapter, **({"steps": config.steps} if config.steps else {})}
    return METHOD_CONFIGS[method or config.method](**fields)


def stage_finetune(state: RunState, config: NightlyConfig, store, registry_url, progress: bool, log) -> dict:
    from alignloop.registry import newest_live
    from alignloop.trainer.config import NEEDS_LIVE_REWARD
    from alignloop.trainer.finetune_job import finetune_from_snapshot
    from alignloop.trainer.reward_model import REWARD_KIND

    live = newest_live(store.versions("adapter"))
    parent = live.version if live else "base"
    init = str(store.fetch("adapter", live.version)) if live else ""
    name, why = config.method, None
    if name in NEEDS_LIVE_REWARD and store.live(REWARD_KIND) is None:
        why = (f"no reward model is live (the reward stage said: {state.done('reward')['reason']})")
        if config.fallback_method:
            name = config.fallback_method
            log(f"{why}: tuning with {name} instead of {config.method} (--fallback-method)")
        else:
            log(f"{why}: {name} optimizes the CLIP score, what serving ranks by")
    snapshot, out = Path(state.done("snapshot")["folder"]), state.folder / "finetune"
    method = method_config_for(config, init, name)
    if config.nproc_per_node > 1:
        report = finetune_under_torchrun(config, name, snapshot, method, out, registry_url, progress)
    else:
        report = finetune_from_snapshot(name, snapshot, method, out=out, registry=registry_url,
                                        publish=False, eval_prompts=config.eval_prompts, progress=progress, log=log)
    return {"adapter": report["adapter"], "parent": parent, "init_adapter": init, "method": name,
            **({"fallback_because": why} if name != config.method else {}),
            "reward_model": report["data"]["reward_model"],  # what it optimized: a head's version, "clip" or None
            "candidate_metrics": report["metrics"], "data": report["data"]}


def finetune_under_torchrun(config: NightlyConfig, name: str, snapshot: Path, method, out: Path, registry_url,
                            progress: bool) -> dict:
    """`alignloop train METHOD --no-publish` on `nproc_per_node` processes (torchrun; this job's lock and state stay
    in this one process); its report is read back from out/report.json. A failure leaves the stage unfinished:
    the next run launches it again and it resumes from out/checkpoint.pt."""
    from alignloop.cli import config_to_args
    from alignloop.trainer.distributed import torchrun_command
    from alignloop.trainer.finetune import check_world_size
    from alignloop.trainer.finetune_job import REPORT

    check_world_size(method, config.nproc_per_node)  # before the processes start and load their models
    args = ["train", name, "--snapshot", str(snapshot), "--out", str(out), "--no-publish",
            "--eval-prompts", str(config.eval_prompts), "--json", *config_to_args(method)]
    args += (["--registry", registry_url] if registry_url else []) + ([] if progress else ["--no-progress"])
    done = subprocess.run(torchrun_command(config.nproc_per_node, args))
    if done.returncode != 0:
        raise UserFacingError(f"the fine-tune on {config.nproc_per_node} processes (torchrun) exited with status "
                              f"{done.returncode}, its errors above; the next run resumes it from {out}")
    return json.loads((out / REPORT).read_text())


def stage_evaluate(state: RunState, config: NightlyConfig, store, progress: bool) -> dict:
    """The parent on the very prompts and seeds the candidate was evaluated on (finetune_from_snapshot's)."""
    import torch

    from alignloop.models import load_clip, load_generator
    from alignloop.trainer.finetune_job import adapter_active, evaluate_splits

    tuned = state.done("finetune")
    method = method_config_for(config, "", tuned.get("method", ""))  # the sampler the candidate was evaluated with
    pipe = load_generator(method.generator, device=method.device or None, dtype=torch.float32)
    clip = load_clip(device=method.device or None)
    with adapter_active(pipe, tuned["parent"], store):
        parent = evaluate_splits(pipe, clip, method, config.eval_prompts, progress)
    candidate = tuned["candidate_metrics"]
    return {"parent_metrics": parent, "seen_pass": candidate["seen_pass"], "parent_seen_pass": parent["seen_pass"],
            "unseen_pass": candidate["unseen_pass"], "parent_unseen_pass": parent["unseen_pass"],
            **seen_drop_verdict(parent, candidate, config)}


def seen_drop_verdict(parent: dict, candidate: dict, config: NightlyConfig) -> dict:
    """{"worse", "drop_p_value"}: worse when the candidate's seen pass rate is below its parent's by more than
    max_drop and by more than chance (paired_drop_p_value below worse_significance)."""
    per_prompt = candidate.get("seen_per_prompt", 1)  # 1: verdicts of an older version, not grouped
    p_value = (paired_drop_p_value(parent.get("seen_passed"), candidate.get("seen_passed"), per_prompt)
               if parent.get("seen_per_prompt", 1) == per_prompt else None)
    drop = parent["seen_pass"] - candidate["seen_pass"]
    beyond_chance = p_value is None or p_value < config.worse_significance
    return {"drop_p_value": p_value, "worse": bool(drop > config.max_drop and beyond_chance)}


def paired_drop_p_value(parent_passed, candidate_passed, per_prompt: int = 1) -> Optional[float]:
    """The chance that the candidate does worse than its parent on at least as many prompts as it did, were it as
    good: a one-sided exact sign test over the prompts on which their paired images (the same seeds, `per_prompt`
    consecutive verdicts a prompt) differ in number passed. Prompts, not images, are the units: an adapter that
    breaks a prompt breaks it at every seed, so images of one prompt do not count as independent evidence (with
    per_prompt 1 it is McNemar's test on the images). None when the verdicts are missing or do not pair up (a
    candidate evaluated by an older version): then any drop over max_drop counts."""
    from scipy.stats import binomtest

    if (not parent_passed or not candidate_passed or len(parent_passed) != len(candidate_passed)
            or len(parent_passed) % per_prompt):
        return None
    nets = [sum(candidate_passed[i:i + per_prompt]) - sum(parent_passed[i:i + per_prompt])
            for i in range(0, len(parent_passed), per_prompt)]
    losses, wins = sum(1 for n in nets if n < 0), sum(1 for n in nets if n > 0)
    if losses + wins == 0:
        return 1.0
    return float(binomtest(losses, losses + wins, 0.5, alternative="greater").pvalue)


def stage_publish(state: RunState, config: NightlyConfig, store, log) -> dict:
    from alignloop.trainer.finetune_job import publish_trained

    tuned, evaluated = state.done("finetune"), state.done("evaluate")
    already = _written_by(store, "adapter", state.run_id)
    if already is not None:
        result = {"version": already.version, "reason": "published before a restart"}
    else:
        metrics = {**tuned["candidate_metrics"], "parent": tuned["parent"],
                   "parent_metrics": evaluated["parent_metrics"]}
        data = {**tuned["data"], "nightly_run": state.run_id, "nightly_config": config.to_dict()}
        method = tuned.get("method", config.method)
        manifest = publish_trained(store, Path(tuned["adapter"]), method,
                                   method_config_for(config, tuned["init_adapter"], method), metrics, data,
                                   why=f"nightly {state.run_id}: seen pass {evaluated['seen_pass']:.3f} vs parent "
                                       f"{tuned['parent']} {evaluated['parent_seen_pass']:.3f}",
                                   parent=None if tuned["parent"] == "base" else tuned["parent"])
        result = {"version": manifest.version}
    if evaluated["worse"]:  # published either way (a candidate, on record), but no canary
        p_value = evaluated.get("drop_p_value")
        result["end"] = ("published", f"candidate {result['version']} passes seen prompts at "
                                      f"{evaluated['seen_pass']:.3f}, below its parent's "
                                      f"{evaluated['parent_seen_pass']:.3f}"
                                      + (f" (paired sign test p = {p_value:.3g})" if p_value is not None else "")
                                      + ": no canary opened")
    return result


def stage_canary(state: RunState, config: NightlyConfig, store, log) -> dict:
    from alignloop.rollout import RolloutError, current_rollout, start_canary

    version = state.done("publish")["version"]
    rollout = current_rollout(store)
    if rollout is not None and rollout.arm("B") is not None and rollout.arm("B").adapter == version:
        return {"rollout": rollout.id, "reason": "opened before a restart"}
    try:
        opened = start_canary(store, version, config.canary_share, who="nightly",
                              why=f"nightly {state.run_id}: candidate {version}")
    except RolloutError as err:  # e.g. last night's canary is still being decided: this candidate waits
        return {"rollout": None, "end": ("published", f"candidate {version} published, no canary opened: {err}")}
    return {"rollout": opened.id, "rollout_arms": opened.describe()}
