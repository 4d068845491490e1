"""Data-parallel fine-tuning (issue 14): `alignloop train rwr` launched as the nightly job launches it, under torchrun
with two CPU processes (gloo), trains the adapter one process trains from the same seed and global batch, and only
rank 0 writes; a batch that does not split, or a method that does not shard, is refused."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from alignloop.trainer import distributed
from alignloop.trainer.config import PpoConfig, RwrConfig
from finetune_fixtures import voted_snapshot

RUN = ["--steps", "3", "--checkpoint-every", "2", "--lr", "1e-3", "--batch-size", "4", "--pretrain-batch-size", "4",
       "--sample-steps", "4", "--eval-prompts", "1", "--no-progress", "--json"]

# Imported by every process of the torchrun launch (PYTHONPATH): each rank records the paths under
# $AUDIT_ROOT it opens for writing, creates, renames or removes, and leaves the list in $AUDIT_LOG/rank<N>.json.
AUDIT = textwrap.dedent('''
    import atexit, json, os, sys

    root, rank = os.environ.get("AUDIT_ROOT"), os.environ.get("RANK")
    if root and rank is not None:
        writes = []

        def hook(event, args):
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
            else:
                path, writing = args[0], event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir")
            if writing and isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root):
                writes.append(os.fspath(path))

        def save():
            with open(os.path.join(os.environ["AUDIT_LOG"], f"rank{rank}.json"), "w") as f:
                json.dump(writes, f)

        sys.addaudithook(hook)
        atexit.register(save)
''')


@pytest.mark.parametrize("method", ["rwr", pytest.param("kto", marks=pytest.mark.slow)])
def test_two_processes_train_the_adapter_one_process_trains_and_only_rank_0_writes(pipe, tmp_path, method):
    """About 50 s on 2 CPU cores per method. KTO (slow) adds the reference point, a mean over the global batch."""
    from alignloop.registry import Registry

    snapshot = voted_snapshot(tmp_path / "snap", pipe, ["two circles", "one square"] * 4)
    train = ["train", method, "--snapshot", str(snapshot), *RUN]
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(AUDIT)
    root = tmp_path / "ddp"
    # One thread per process in both runs (torchrun's default), so both sum in the same order within a process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUDIT_ROOT": str(root), "AUDIT_LOG": str(tmp_path / "audit"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "audit"), os.environ.get("PYTHONPATH")]))}

    def run(command):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    # 1. One process
    run([sys.executable, "-m", "alignloop", *train, "--out", str(tmp_path / "one"), "--no-publish"])
    # 2. Two processes, launched as the nightly job launches them, every write under ddp/ recorded per rank
    reports = run(distributed.torchrun_command(2, [*train, "--out", str(root / "run"),
                                                   "--registry", str(root / "registry")]))
    assert len(reports) == 1 and reports[0] == json.loads((root / "run" / "report.json").read_text())

    # 3. The same steps: every logged figure (losses, gradient norm, KTO's batch statistics) within 1e-4, so both
    #    runs drew the same samples, noise and timesteps, and the averaged gradient is the global batch's (a sum
    #    instead of a mean would double the norm; AdamW's update alone would hide it)
    rows = [[json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            for folder in (tmp_path / "one", root / "run")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]  # one writer: no step logged twice
    for key in rows[0][0]:
        if key != "seconds":
            assert [r[key] for r in rows[1]] == pytest.approx([r[key] for r in rows[0]], rel=1e-4, abs=2e-6), key
    # 4. The same adapter, up to fp32 noise. Measured on 2 CPU cores, one thread per process: max |difference|
    #    8.0e-6 (RWR) and 2.6e-5 (KTO), the weights' max |w| being 0.58 and training moving them by ~3e-3 (3 steps
    #    of lr 1e-3). That is noise, not a data-parallel error: the one-process run alone, at 2 threads instead of
    #    1, moves by 2.0e-4 (RWR) and 1.3e-3 (KTO), since AdamW divides each gradient by its own scale and so turns
    #    reduction-order noise in near-cancelling components into steps of up to lr. Bounds: ~10x the measured.
    one = load_file(tmp_path / "one" / "adapter" / "pytorch_lora_weights.safetensors")
    two = load_file(root / "run" / "adapter" / "pytorch_lora_weights.safetensors")
    assert sorted(one) == sorted(two)
    difference = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{method}: max |1-process - 2-process| = {difference:.3g}, "
          f"max |w| = {max(v.abs().max().item() for v in one.values()):.3g}")
    assert difference < {"rwr": 1e-4, "kto": 3e-4}[method]
    # 5. Rank 0 wrote the run folder and the one published version; rank 1 wrote nothing
    writes = {rank: json.loads((tmp_path / "audit" / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert writes[1] == []
    assert any(p.endswith("metrics.jsonl") for p in writes[0]) and any("registry" in p for p in writes[0])
    assert [m.version for m in Registry(root / "registry").versions("adapter")] == [reports[0]["published"]]


def test_each_rank_takes_its_own_slice_of_the_global_batch():
    batch = list(range(8))
    shards = [distributed.World(rank, 2, torch.device("cpu")).shard(batch) for rank in (0, 1)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert distributed.World(0, 1, torch.device("cpu")).shard(batch) == batch


@pytest.mark.parametrize("config, message", [
    (RwrConfig(batch_size=5), "batch_size 5 does not split into 2 equal shards"),
    (RwrConfig(batch_size=4, pretrain_batch_size=3), "pretrain_batch_size 3 does not split into 2"),
    (PpoConfig(), "PpoConfig does not run data-parallel"),
])
def test_a_world_the_run_cannot_split_over_is_refused(monkeypatch, tmp_path, config, message):
    from alignloop.errors import UserFacingError
    from alignloop.trainer.finetune import LoraRun

    monkeypatch.setattr(distributed, "init", lambda device: distributed.World(0, 2, torch.device("cpu")))
    with pytest.raises(UserFacingError, match=message):
        LoraRun(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_nightly_finetune_stage_on_several_processes_launches_train_under_torchrun(tmp_path, monkeypatch):
    """The stage hands its method config to `alignloop train` as flags and reads the run's report back."""
    from alignloop.cli import build_parser, config_from_args
    from alignloop.errors import UserFacingError
    from alignloop.registry import Registry
    from alignloop.trainer import nightly
    from alignloop.trainer.config import KtoConfig, NightlyConfig

    launched = []

    def fake_run(command):
        launched.append(command)
        (tmp_path / "run" / "finetune").mkdir(parents=True)
        report = {"adapter": "A", "metrics": {"seen_pass": 0.5}, "data": {"votes": 8, "reward_model": None}}
        (tmp_path / "run" / "finetune" / "report.json").write_text(json.dumps(report))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(nightly.subprocess, "run", fake_run)
    monkeypatch.setattr(nightly, "method_config_for", lambda config, init, method="": KtoConfig(
        steps=2, batch_size=4, lr=3e-4, init_adapter=init))
    state = nightly.RunState(tmp_path / "run", {"stages": {"snapshot": {"folder": str(tmp_path / "snap")}}})
    config = NightlyConfig(method="kto", nproc_per_node=2, eval_prompts=3)
    result = nightly.stage_finetune(state, config, Registry(tmp_path / "registry"), None, False, print)
    assert result["adapter"] == "A" and result["candidate_metrics"] == {"seen_pass": 0.5} and result["parent"] == "base"
    assert result["reward_model"] is None  # the run's own word on what it optimized, read back from its report

    (command,) = launched
    alignloop_args = command[command.index("alignloop") + 1:]
    assert command[:command.index("alignloop") + 1] == distributed.torchrun_command(2, [])
    args = build_parser().parse_args(alignloop_args)
    assert (args.train_command, args.no_publish, args.eval_prompts) == ("kto", True, 3)
    assert config_from_args(KtoConfig, args) == KtoConfig(steps=2, batch_size=4, lr=3e-4)
    assert args.out == tmp_path / "run" / "finetune"

    with pytest.raises(UserFacingError, match="batch_size 4 does not split into 3"):  # before anything starts
        nightly.stage_finetune(state, NightlyConfig(method="kto", nproc_per_node=3), Registry(tmp_path / "registry"),
                               None, False, print)
    with pytest.raises(ValueError, match="nproc_per_node must be 1 for method ppo"):
        NightlyConfig(method="ppo", nproc_per_node=2)
