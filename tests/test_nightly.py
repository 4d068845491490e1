"""`alignloop nightly` against a real broker: a run killed after any stage, or between a registry write and its
state, publishes exactly one candidate when started again; a second run while one holds the lock says who holds
it and exits 3; a run with nothing new publishes nothing."""

import json
import shutil
import uuid

import pytest
from kafka import KafkaProducer

from alignloop.trainer import nightly
from alignloop.trainer.config import KtoConfig, NightlyConfig

pytestmark = pytest.mark.usefixtures("kafka_broker")

PROMPTS = ["two circles", "a red square", "three triangles"]  # seen prompts
STEPS = 4  # the drawing steps the events record (the redraw uses them)


def _small_method(config, init_adapter, method=""):
    """A two-step KTO run with small batches whatever the method: the orchestration is under test, not the method."""
    return KtoConfig(steps=2, batch_size=4, pretrain_batch_size=4, sample_steps=STEPS, init_adapter=init_adapter)


@pytest.fixture
def traffic(pipe, kafka_broker, kafka_topics, tmp_path, monkeypatch):
    """Generation events for images the bundled generator drew, and thumbs on them, on fresh topics."""
    from alignloop.events import FeedbackEvent, GeneratedImage, GenerationEvent, GenerationParams, hash_user_id
    from alignloop.feedback.image_store import ImageStore
    from alignloop.generation import generate
    from alignloop.serving.handlers import encode_png

    monkeypatch.setattr(nightly, "method_config_for", _small_method)
    store = ImageStore(f"file://{tmp_path / 'images'}")

    def produce(first_seed: int, adapter: str = "base"):
        """One vote on each of 12 images drawn from seeds first_seed.. (as serving draws them, base weights)."""
        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
        prompts = PROMPTS * 4
        seeds = list(range(first_seed, first_seed + len(prompts)))
        for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, generate(pipe, prompts, seeds, STEPS, 5.0))):
            request_id, image_id = f"req-{seed}", f"img-{seed}-{uuid.uuid4().hex[:6]}"
            shown = GeneratedImage(image_id=image_id, rank=1, reward=0.5, candidate_index=0, seed=seed,
                                   shown_probability=1.0, uri=store.put(image_id, encode_png(image)))
            event = GenerationEvent(request_id=request_id, prompt=prompt, arm="A", adapter_version=adapter,
                                    params=GenerationParams(n=1, k=1, steps=STEPS, guidance=5.0, seed=seed),
                                    images=[shown], reward_model="clip")
            vote = FeedbackEvent(request_id=request_id, image_id=image_id, vote="up" if i % 2 else "down",
                                 user_hash=hash_user_id(f"user-{i % 3}"), arm="A", adapter_version=adapter,
                                 image_uri=shown.uri)
            producer.send(kafka_topics.generations, key=request_id.encode(), value=event.model_dump_json(by_alias=True).encode())
            producer.send(kafka_topics.feedback, key=image_id.encode(), value=vote.model_dump_json(by_alias=True).encode())
        producer.flush()
        producer.close()

    produce(500)
    prefix = kafka_topics.generations[:-len("alignloop.generations")]
    return {"bootstrap": kafka_broker.bootstrap, "images": store.url, "prefix": prefix, "home": tmp_path / "home",
            "registry": str(tmp_path / "registry"), "produce": produce}


def _run(traffic, **kwargs):
    config = NightlyConfig(method="kto", eval_prompts=1)
    return nightly.run_nightly(config, home_dir=traffic["home"], registry_url=traffic["registry"],
                               bootstrap=traffic["bootstrap"], images_url=traffic["images"],
                               topic_prefix=traffic["prefix"], progress=False, log=lambda *a: None, **kwargs)


def _adapters(traffic):
    from alignloop.registry import Registry

    return Registry(traffic["registry"]).versions("adapter")


@pytest.mark.slow
def test_a_run_killed_after_any_stage_publishes_exactly_one_candidate_and_opens_the_canary(traffic):
    from alignloop.registry import Registry
    from alignloop.rollout import current_rollout

    for stage in nightly.STAGES[:-1]:  # a kill after each stage's state was written
        state = _run(traffic, stop_after=stage)
        assert "outcome" not in state and list(state["stages"]) == list(nightly.STAGES[:nightly.STAGES.index(stage) + 1])
    state = _run(traffic)
    assert state["outcome"] == "canary", state
    adapters = _adapters(traffic)
    assert [a.state for a in adapters] == ["canary"]
    assert adapters[0].data["nightly_run"] == state["run_id"] and adapters[0].metrics["parent"] == "base"
    assert "seen_pass" in adapters[0].metrics["parent_metrics"]
    # the gate paired the candidate's per-image verdicts with its parent's (same prompts and seeds)
    metrics = adapters[0].metrics
    candidate_passed, parent_passed = metrics["seen_passed"], metrics["parent_metrics"]["seen_passed"]
    assert len(candidate_passed) == len(parent_passed) > 0
    assert metrics["seen_per_prompt"] == metrics["parent_metrics"]["seen_per_prompt"] == 4
    assert state["stages"]["evaluate"]["drop_p_value"] == nightly.paired_drop_p_value(parent_passed,
                                                                                        candidate_passed, 4)
    registry = Registry(traffic["registry"])
    assert len(registry.versions("reward")) == 1
    assert current_rollout(registry).arm("B").adapter == adapters[0].version
    # The next night, with no new votes: nothing to do, nothing published.
    again = _run(traffic)
    assert again["outcome"] == "nothing new" and len(_adapters(traffic)) == 1
    # Promoted, then new votes: the next cycle tunes the live adapter, not the base.
    from alignloop.rollout import promote

    promote(registry, adapters[0].version, who="test", why="users liked it")
    traffic["produce"](900)
    second = _run(traffic)
    assert second["outcome"] == "canary", second
    assert second["stages"]["finetune"]["parent"] == adapters[0].version
    newest = _adapters(traffic)[-1]
    assert newest.parent == adapters[0].version and newest.config["init_adapter"]
    assert newest.data["snapshot_version"] != adapters[0].data["snapshot_version"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "publish"])
def test_a_kill_between_a_registry_write_and_the_state_does_not_publish_twice(traffic, monkeypatch, stage):
    real = nightly.RunState.finish_stage

    def killed(self, name, result):
        if name == stage:
            raise KeyboardInterrupt(f"killed after {stage} wrote to the registry")
        real(self, name, result)

    monkeypatch.setattr(nightly.RunState, "finish_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(traffic)
    monkeypatch.setattr(nightly.RunState, "finish_stage", real)
    state = _run(traffic)
    assert state["outcome"] == "canary" and state["stages"][stage]["reason"] == "published before a restart"
    assert len(_adapters(traffic)) == 1
    from alignloop.registry import Registry

    assert len(Registry(traffic["registry"]).versions("reward")) == 1


def test_a_second_run_says_who_holds_the_lock_and_exits_3(tmp_path, monkeypatch, capsys):
    from alignloop.cli import main

    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    holder = nightly.NightlyLock(tmp_path / "nightly")
    holder.name("20261202-010000")
    try:
        assert main(["nightly", "--no-progress", "--bootstrap", "127.0.0.1:1"]) == nightly.LOCKED_EXIT
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert "another nightly run holds" in err and "run 20261202-010000" in err and "pid " in err


def test_an_unfinished_run_resumes_only_with_its_config_or_is_abandoned(tmp_path):
    root = tmp_path / "nightly"
    first = nightly.open_run(root, NightlyConfig(method="kto"), abandon=False, log=lambda *a: None)
    with pytest.raises(nightly.UserFacingError, match="another config"):
        nightly.open_run(root, NightlyConfig(method="rwr"), abandon=False, log=lambda *a: None)
    assert nightly.open_run(root, NightlyConfig(method="kto"), abandon=False, log=lambda *a: None).run_id == first.run_id
    fresh = nightly.open_run(root, NightlyConfig(method="rwr"), abandon=True, log=lambda *a: None)
    assert fresh.run_id != first.run_id
    assert json.loads((first.folder / "state.json").read_text())["outcome"] == "abandoned"


def test_a_run_started_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    root = tmp_path / "nightly"
    run = nightly.open_run(root, NightlyConfig(), abandon=False, log=lambda *a: None)
    state = json.loads((run.folder / "state.json").read_text())
    del state["config"]["worse_significance"]  # as an older version wrote it
    (run.folder / "state.json").write_text(json.dumps(state))
    assert nightly.open_run(root, NightlyConfig(), abandon=False, log=lambda *a: None).run_id == run.run_id
    with pytest.raises(nightly.UserFacingError, match="another config"):
        nightly.open_run(root, NightlyConfig(worse_significance=0.2), abandon=False, log=lambda *a: None)


@pytest.mark.parametrize("field, value, message", [("method", "dpo", "method must be one of"),
                                                   ("canary_share", 1.0, "canary_share must be in"),
                                                   ("min_new_votes", 0, "min_new_votes must be"),
                                                   ("fallback_method", "ppo", "fallback_method must be rwr, kto"),
                                                   ("worse_significance", 0.0, "worse_significance must be in")])
def test_bad_nightly_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        NightlyConfig(**{field: value})


def _evaluation(passed, per_prompt=4):
    return {"seen_pass": sum(passed) / len(passed), "seen_passed": passed, "seen_per_prompt": per_prompt}


def _flipped(passed, images):
    return [1 - v if i in images else v for i, v in enumerate(passed)]


def test_the_gate_holds_back_a_candidate_only_for_a_drop_beyond_chance():
    """32 prompts x 4 seeds, paired. A candidate one image behind its parent is chance, not a regression (the old
    rule, any drop, held such a candidate back); worse on ten prompts and better on one is a regression."""
    parent = [1, 1, 0, 0] * 32
    one_behind = _flipped(parent, {0})
    assert nightly.seen_drop_verdict(_evaluation(parent), _evaluation(one_behind), NightlyConfig()) == \
        {"drop_p_value": 0.5, "worse": False}
    regressed = _flipped(parent, {4 * p for p in range(10)} | {4 * 10 + 2})  # P(X >= 10 | 11, 1/2) = 12/2048
    verdict = nightly.seen_drop_verdict(_evaluation(parent), _evaluation(regressed), NightlyConfig())
    assert verdict == {"drop_p_value": pytest.approx(12 / 2048), "worse": True}
    # worse_significance 1.0 is the old rule; without per-image verdicts (an older candidate) any drop counts
    assert nightly.seen_drop_verdict(_evaluation(parent), _evaluation(one_behind),
                                     NightlyConfig(worse_significance=1.0))["worse"]
    assert nightly.seen_drop_verdict(_evaluation(parent), {"seen_pass": 63 / 128}, NightlyConfig()) == \
        {"drop_p_value": None, "worse": True}
    # max_drop still bounds it: the same regression within a tolerance of 0.1 opens the canary
    assert not nightly.seen_drop_verdict(_evaluation(parent), _evaluation(regressed), NightlyConfig(max_drop=0.1))["worse"]
    # the same images, or a gain: nothing to hold back
    assert nightly.seen_drop_verdict(_evaluation(parent), _evaluation(parent), NightlyConfig()) == \
        {"drop_p_value": 1.0, "worse": False}


def test_the_gate_counts_prompts_not_images():
    """Five images lost on two prompts and one image won on a third: two of three prompts worse is chance (p = 1/2);
    counted as independent images (McNemar's test, per_prompt 1) the same verdicts read as a regression."""
    parent = [1, 1, 1, 0] * 32
    few_prompts = _flipped(parent, {0, 1, 2, 4, 5, 11})  # prompt 0 loses 3, prompt 1 loses 2, prompt 2 wins 1
    by_prompt = nightly.seen_drop_verdict(_evaluation(parent), _evaluation(few_prompts), NightlyConfig())
    assert by_prompt == {"drop_p_value": pytest.approx(0.5), "worse": False}
    by_image = nightly.seen_drop_verdict(_evaluation(parent, 1), _evaluation(few_prompts, 1), NightlyConfig())
    assert by_image == {"drop_p_value": pytest.approx(7 / 64), "worse": False}  # P(X >= 5 | 6)
    assert nightly.paired_drop_p_value(parent, _flipped(parent, set(range(0, 36, 4)) | {2}), 1) < 0.05
    # groups that do not match (another per_prompt, a partial prompt) do not pair up: any drop counts
    assert nightly.seen_drop_verdict(_evaluation(parent, 4), _evaluation(few_prompts, 1), NightlyConfig()) == \
        {"drop_p_value": None, "worse": True}
    assert nightly.paired_drop_p_value(parent[:-1], few_prompts[:-1], 4) is None


def _tiny_adapter(tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(weights))
    return {"pytorch_lora_weights.safetensors": weights}


def _resume(tmp_path):
    return nightly.run_nightly(NightlyConfig(), home_dir=tmp_path / "home", registry_url=str(tmp_path / "registry"),
                               progress=False, log=lambda *a: None)


def _unfinished_run(tmp_path, stages: dict):
    """A run killed after writing these stages' results and before recording how it ended."""
    state = nightly.open_run(tmp_path / "home" / "nightly", NightlyConfig(), abandon=False, log=lambda *a: None)
    for stage, result in stages.items():
        state.finish_stage(stage, result)
    return state


def test_a_run_killed_before_recording_its_end_ends_as_its_last_stage_said(tmp_path):
    """A stage that ended the run (the gate held the candidate back) and was killed before the run's outcome was
    written: resumed, the run ends there; it does not go on to open a canary. A run killed after its last stage
    ends as a canary instead of failing to find a stage to resume at."""
    done = {stage: {"stub": True} for stage in nightly.STAGES[:4]}
    held_back = ("published", "candidate v000001 passes seen prompts at 0.400, below its parent's 0.600: no canary")
    _unfinished_run(tmp_path, {**done, "publish": {"version": "v000001", "end": held_back}})
    state = _resume(tmp_path)
    assert (state["outcome"], state["reason"]) == held_back and "canary" not in state["stages"]

    _unfinished_run(tmp_path, {**done, "publish": {"version": "v000002"}, "canary": {"rollout": "v000003"}})
    state = _resume(tmp_path)
    assert state["outcome"] == "canary" and "v000002" in state["reason"]


def test_a_held_back_candidate_published_before_a_restart_still_opens_no_canary(tmp_path):
    """The publish stage killed between its registry write and its state: resumed, it finds its candidate and
    applies the gate's verdict again (before, it returned the version alone and the canary stage opened it)."""
    from alignloop.registry import Registry
    from alignloop.rollout import current_rollout, publish_adapter

    registry = Registry(tmp_path / "registry")
    state = _unfinished_run(tmp_path, {"finetune": {"parent": "base"},
                                       "evaluate": {"worse": True, "seen_pass": 0.4, "parent_seen_pass": 0.6,
                                                    "drop_p_value": 0.001}})
    published = publish_adapter(registry, _tiny_adapter(tmp_path), data={"nightly_run": state.run_id}, who="t", why="t")
    result = nightly.stage_publish(state, NightlyConfig(), registry, log=lambda *a: None)
    assert result["version"] == published.version and result["reason"] == "published before a restart"
    assert result["end"][0] == "published" and "p = 0.001" in result["end"][1] and "no canary" in result["end"][1]
    assert current_rollout(registry) is None and len(registry.versions("adapter")) == 1


def test_votes_count_up_from_the_last_run_that_tuned_not_from_one_that_found_too_few(tmp_path):
    """Snapshots are cumulative: with --min-new-votes 100 and 60 votes a night, the second night has 120 new votes
    since the last tuned run; a 'nothing new' run in between is not the baseline."""
    root = tmp_path / "nightly"
    for run_id, outcome, votes in (("20261201-000000", "canary", 500), ("20261202-000000", "nothing new", 560),
                                   ("20261203-000000", "abandoned", 600)):
        (root / "runs" / run_id).mkdir(parents=True)
        (root / "runs" / run_id / "state.json").write_text(json.dumps(
            {"run_id": run_id, "outcome": outcome, "stages": {"snapshot": {"version": run_id, "votes": votes}}}))
    assert nightly.last_finished_snapshot(root) == {"version": "20261201-000000", "votes": 500}


def test_a_candidate_waits_while_another_canary_is_being_decided(tmp_path):
    """The canary stage of a run whose candidate cannot start (last night's canary is still undecided) ends the
    run with the reason, leaving the running canary alone."""
    from alignloop.registry import Registry
    from alignloop.rollout import current_rollout, publish_adapter, start_canary

    import torch
    from safetensors.torch import save_file

    registry = Registry(tmp_path / "registry")
    weights = tmp_path / "w.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(weights))
    first, second = (publish_adapter(registry, {"pytorch_lora_weights.safetensors": weights}, who="t", why="t").version
                     for _ in range(2))
    start_canary(registry, first, 0.1, who="t", why="last night")
    state = nightly.open_run(tmp_path / "nightly", NightlyConfig(), abandon=False, log=lambda *a: None)
    state.finish_stage("publish", {"version": second})
    result = nightly.stage_canary(state, NightlyConfig(), registry, log=lambda *a: None)
    assert result["end"][0] == "published" and "already in canary" in result["end"][1]
    assert current_rollout(registry).arm("B").adapter == first


def test_an_unreachable_broker_is_a_one_line_error_and_the_run_can_resume(tmp_path, monkeypatch, capsys):
    from alignloop.cli import main

    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    assert main(["nightly", "--no-progress", "--bootstrap", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "no Kafka broker answers at 127.0.0.1:1" in err and "Traceback" not in err
    (state,) = nightly._runs(tmp_path / "nightly")
    assert state.data["stages"] == {} and "outcome" not in state.data  # nothing done, resumed next time


def test_without_a_live_reward_model_refl_optimizes_the_clip_score_or_the_fallback_tunes(traffic, monkeypatch):
    """The reward stage's gate can keep the new head a candidate (it must beat the CLIP score first): a method that
    optimizes the live reward then optimizes what serving ranks by, the CLIP score; a fallback method named in the
    config (KTO, from the thumbs alone) tunes instead."""
    from alignloop.registry import Registry
    from alignloop.trainer.config import ReflConfig

    _run(traffic, stop_after="snapshot")  # a run with its snapshot, resumed below as the reward stage left it
    state = nightly.open_run(traffic["home"] / "nightly", NightlyConfig(method="kto", eval_prompts=1), abandon=False,
                             log=lambda *a: None)
    state.finish_stage("reward", {"version": None, "state": "candidate", "reason": "kept as candidate (test)"})
    registry = Registry(traffic["registry"])
    assert registry.live("reward") is None
    logged = []
    result = nightly.stage_finetune(state, NightlyConfig(method="refl", fallback_method="kto", eval_prompts=1),
                                    registry, traffic["registry"], False, logged.append)
    assert result["method"] == "kto" and "kept as candidate (test)" in result["fallback_because"]
    assert any("tuning with kto instead of refl" in line for line in logged)

    def small(config, init_adapter, method=""):
        if (method or config.method) != "refl":
            return _small_method(config, init_adapter, method)
        return ReflConfig(steps=2, batch_size=4, sample_steps=STEPS, init_adapter=init_adapter)

    monkeypatch.setattr(nightly, "method_config_for", small)
    shutil.rmtree(state.folder / "finetune")  # the KTO run's: another config is refused there
    result = nightly.stage_finetune(state, NightlyConfig(method="refl", eval_prompts=1), registry,
                                    traffic["registry"], False, logged.append)
    assert result["method"] == "refl" and result["reward_model"] == "clip" and "fallback_because" not in result
    assert any("refl optimizes the CLIP score" in line for line in logged)
