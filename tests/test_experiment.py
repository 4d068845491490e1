"""`alignloop experiment`: its config and command line, the measurement's best-k rows, the report it writes. The
whole loop (Kafka, the service, two nightly cycles) runs as `alignloop experiment --quick` in .ci/run."""

import json

import numpy as np
import pytest

from alignloop.trainer.config import QUICK_EXPERIMENT, ExperimentConfig


@pytest.mark.parametrize("field, value, message", [("k", 17, "k must be in 1..n"),
                                                   ("method", "dpo", "method must be one of"),
                                                   ("served_k", 20, "served_k must be in"),
                                                   ("eval_per_prompt", 1, "eval_per_prompt must be >= 2")])
def test_a_bad_experiment_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**{field: value})


def test_quick_applies_to_every_flag_not_given_and_a_used_folder_is_refused(tmp_path, monkeypatch, capsys):
    from alignloop.cli import build_parser, main
    from alignloop.trainer import experiment

    seen = {}

    def fake_run(config, out, **kwargs):  # the command line is under test, not the run
        seen["config"] = config
        return {"checks": {"ran": True}}

    monkeypatch.setattr(experiment, "run_experiment", fake_run)
    assert main(["experiment", "--quick", "--out", str(tmp_path / "a"), "--n", "16"]) == 0
    config = seen["config"]
    assert config.n == 16 and config.requests_per_cycle == QUICK_EXPERIMENT["requests_per_cycle"]
    assert config.steps == ExperimentConfig().steps  # neither given nor in the quick preset: the default
    assert build_parser().parse_args(["experiment", "--out", "x"]).func  # no flag: the full run's defaults
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "experiment.json").write_text("{}")
    assert main(["experiment", "--out", str(tmp_path / "used")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["experiment", "--out", str(tmp_path / "b"), "--k", "99"]) == 2
    assert "--k must be in 1..n" in capsys.readouterr().err


def test_best_k_rows_pick_each_prompts_top_scored_images(pipe, monkeypatch):
    """measure_split's served rows judge the k best of each prompt's n by the reward: with the oracle's own verdict
    as the reward they pass at least as often as the generator alone, with its negation at most as often."""
    import torch

    from alignloop.trainer import experiment
    from alignloop.world.oracle import judge

    class FakeClip:  # the embeddings fidelity and diversity need; their values are not under test here
        def encode_images(self, images):
            return torch.tensor(np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images]) + 1.0)

    def oracle_reward(sign):
        def reward(images, prompts):
            from alignloop.world.grammar import parse_prompt

            return torch.tensor([sign * float(judge(im, parse_prompt(p)).passed) for im, p in zip(images, prompts)]), {}
        return reward

    config = ExperimentConfig(steps=4, eval_prompts=4, eval_per_prompt=2, served_per_prompt=6, served_k=2)
    measured = experiment.measure_split(pipe, FakeClip(), "unseen", 6, config,
                                        {"best": oracle_reward(1.0), "worst": oracle_reward(-1.0)}, progress=False)
    alone, best, worst = measured["alone"], measured["best_k"]["best"], measured["best_k"]["worst"]
    assert worst["overall"] <= alone["overall"] <= best["overall"]
    assert set(alone) == {"overall", "count", "color", "background", "combination"}
    assert measured["preference_accuracy"]["best"]["accuracy"] in (None, 1.0)
    assert len(measured["grid"]) == 4 * 2  # every prompt's images alone (at most 8 prompts)


def _report(tmp_path):
    rows = {"base": 0.4, "rejection_clip": 0.55, "rejection_reward": 0.5, "kto": 0.42, "candidate1": 0.45,
            "cycle1": 0.45, "served_cycle1": 0.6, "cycle2": 0.45, "served_cycle2": 0.6}
    split = {r: {"overall": v, "count": v - 0.1, "color": v + 0.1, "background": 0.9, "combination": None}
             for r, v in rows.items()}
    (tmp_path / "traffic.json").write_text(json.dumps({"requests": [], "votes": [
        {"t": float(t), "phase": "cycle1-canary", "arm": arm, "adapter": "v1" if arm == "B" else "base",
         "vote": "up" if t % 3 else "down", "passed": True, "category": "count"} for t in range(20) for arm in "AB"]}))
    cycle = {"cycle": 1, "live_before": "base", "live_after": "v000001", "promoted": True, "candidate": "v000001",
             "traffic_seconds": 10.0, "nightly_seconds": 20.0, "nightly_outcome": "canary",
             "nightly_folder": str(tmp_path / "none"), "nightly_stages": {"finetune": {"method": "kto"}},
             "guardrail": [{"t": 12.0, "requests": 8, "action": "promote", "reason": "B better"}],
             "canary_thumbs": {"A base": {"votes": 20, "up_rate": 0.6, "oracle_pass_rate": 0.5}},
             "reward_version": "v000001", "reward_state": "live"}
    quiet_night = {**cycle, "cycle": 2, "live_before": "v000001", "promoted": False, "guardrail": [],
                   "nightly_stages": {"finetune": {"method": "refl", "reward_model": "clip"},
                                      "publish": {"end": ["published", "candidate v000002 is worse: no canary opened"]}}}
    return {"quick": True, "seed": 0, "date": "2026-12-03 00:00 UTC", "seconds": 300.0, "machine": {"cpu_count": 2},
            "config": ExperimentConfig(**QUICK_EXPERIMENT).to_dict(), "seen": split, "unseen": split,
            "fidelity": {"seen": {r: 0.01 for r in rows}, "unseen": {r: 0.02 for r in rows}},
            "diversity": {"seen": {r: 0.1 for r in rows}, "unseen": {r: 0.1 for r in rows}},
            "traffic": {"requests": 40, "votes": 160, "feedback_events_on_topic": 160, "failures": [],
                        "shed_and_retried": 0},
            "cycles": [cycle, quiet_night],
            "reward_model": {"live": None, "rejection_reward": "v000003",
                             "per_cycle": [{"cycle": 1, "version": "v000001", "state": "live",
                                            "held_out_accuracy": 0.7, "clip_score_accuracy": 0.8,
                                            "held_out_pairs": 30}]},
            "preference_accuracy_unseen": {"rejection_clip": {"accuracy": 0.8, "pairs": 50},
                                           "rejection_reward": {"accuracy": 0.7, "pairs": 50}},
            "promotions": [{"cycle": 1, "promoted": "v000001", "replaced": "base", "seen_pass": 0.45,
                            "unseen_pass": 0.45, "replaced_seen_pass": 0.4, "replaced_unseen_pass": 0.4,
                            "worse": False}],
            "methods": {"kto": {"version": "v000001", "same_as": "candidate1",
                                "metrics_jsonl": str(tmp_path / "none.jsonl")}},
            "grids": {}, "checks": {"no_failed_request": True}, "goals": experiment_goals(split)}


def experiment_goals(split):
    from alignloop.trainer.experiment import goals

    return goals({"unseen": split, "cycles": [{"cycle": 2}]})


def test_the_report_has_every_row_its_plots_and_the_goals_as_measured(tmp_path):
    from alignloop.trainer.experiment_report import write_report

    report = _report(tmp_path)
    assert report["goals"]["served_minus_base_unseen"] == pytest.approx(0.2) and not report["goals"]["served_met"]
    path = write_report(report, tmp_path)
    text = path.read_text()
    for row in ("base", "rejection_clip", "kto", "cycle2", "served_cycle2"):
        assert f"| {row} | " in text
    assert "| base | 0.400 | 0.300 | 0.500 | 0.900 | - |" in text  # a category without prompts is "-"
    assert "+0.200 (goal +0.30: not met)" in text
    assert "after 8 canary requests: promote: B better" in text
    assert "the nightly job: candidate v000002 is worse: no canary opened" in text  # why cycle 2 had no canary
    assert "tuned with refl on the CLIP score (no reward model was live)" in text and "tuned with kto\n" in text
    assert "Diffusion-KTO adapter (cycle 1's snapshot, from the base): the same run as candidate1 |" in text
    assert "best k of n by the learned reward (v000003, a candidate: none was live) |" in text
    assert "CLIP score 0.800 (50 pairs), learned reward (v000003, a candidate: none was live) 0.700 (50 pairs)" in text
    for png in ("pass-rates.png", "categories-unseen.png", "guardrail.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    assert "training-curves.png" not in text  # no metrics.jsonl in the run folders: no empty plot


def test_cycle_1s_candidate_stands_for_its_method_only_when_it_is_the_same_run():
    from alignloop.trainer.config import KtoConfig, RwrConfig
    from alignloop.trainer.experiment import cycle1_candidate_if_same_run

    config = ExperimentConfig(method="kto", method_steps=3)
    cycle = {"candidate": "v000001", "nightly_stages": {"finetune": {"method": "kto", "init_adapter": ""}}}
    assert cycle1_candidate_if_same_run("kto", KtoConfig(seed=0, steps=3), config, cycle) == "v000001"
    # another step count, seed or method, a night tuned from a live adapter, or no candidate: trained anew
    assert cycle1_candidate_if_same_run("kto", KtoConfig(seed=0, steps=4), config, cycle) is None
    assert cycle1_candidate_if_same_run("kto", KtoConfig(seed=1, steps=3), config, cycle) is None
    assert cycle1_candidate_if_same_run("rwr", RwrConfig(seed=0, steps=3), config, cycle) is None
    from_live = {**cycle, "nightly_stages": {"finetune": {"method": "kto", "init_adapter": "/registry/v000009"}}}
    assert cycle1_candidate_if_same_run("kto", KtoConfig(seed=0, steps=3), config, from_live) is None
    assert cycle1_candidate_if_same_run("kto", KtoConfig(seed=0, steps=3), config, {**cycle, "candidate": None}) is None


def test_each_cycle_is_served_by_the_head_live_after_it_not_the_last_one():
    from alignloop.trainer.experiment import serving_rankers

    cycles = [{"cycle": 1, "reward_version": "v000001", "reward_state": "candidate"},
              {"cycle": 2, "reward_version": "v000002", "reward_state": "live"},
              {"cycle": 3, "reward_version": "v000003", "reward_state": "candidate"},
              {"cycle": 4, "reward_version": None, "reward_state": None}]  # a night with nothing new
    assert serving_rankers(cycles) == {1: "clip", 2: "v000002", 3: "v000002", 4: "v000002"}
