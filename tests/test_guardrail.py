"""The guardrail: the decision rule on constructed counts (alignloop.guardrail.decide), and `alignloop rollout
watch --once` against the real broker, which must leave the registry in the state the votes call for."""

import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch
from kafka import KafkaProducer
from safetensors.torch import save

from alignloop import rollout
from alignloop.cli import main
from alignloop.events import FEEDBACK_TOPIC, FeedbackEvent, GeneratedImage, GenerationEvent, GenerationParams
from alignloop.feedback.producer import EventProducer
from alignloop.guardrail import ArmStats, GuardrailConfig, RewardTally, decide, watch
from alignloop.registry import Registry

T0 = datetime(2026, 11, 28, 7, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
FAST = GuardrailConfig(draws=20_000)  # the rule with fewer draws: a unit test's decisions are far from the bars


def _arms(up_a, n_a, up_b, n_b):
    return ArmStats("A", "v000001", up_a, n_a - up_a), ArmStats("B", "v000002", up_b, n_b - up_b)


def _rewards(stats: ArmStats, scores, model="v000004") -> ArmStats:
    tally = stats.rewards.setdefault(model, RewardTally())
    for score in scores:
        tally.add(float(score))
    return stats


# -- the rule -----------------------------------------------------------------------------------------------


def test_ten_points_better_is_promoted_and_ten_worse_rolled_back():
    better = decide(*_arms(180, 400, 220, 400), FAST, T0 + HOUR, T0)  # 0.45 vs 0.55
    assert better.action == "promote" and better.reason.startswith("B is better: P(B>A)=0.99")
    n = better.numbers
    assert n["a"] == {"arm": "A", "adapter": "v000001", "up": 180, "down": 220, "rate": 0.45, "clusters": 0,
                      "design_effect": 1.0}  # counts given directly: no clusters, each vote independent
    assert n["b"]["rate"] == 0.55 and n["p_b_beats_a"] > 0.99 and n["p_b_beats_a_by_min_lift"] >= 0.99
    assert 0 <= n["expected_loss_b"] < 0.001 and n["exposure_s"] == 3600.0
    assert "thumbs-up B 0.550 (220/400) vs A 0.450 (180/400)" in better.reason

    worse = decide(*_arms(220, 400, 180, 400), FAST, T0 + HOUR, T0)
    assert worse.action == "rollback" and worse.reason.startswith("B is worse: P(B>A)=0.00")


def _look_as_votes_arrive(p_a: float, p_b: float, seed: int, step: int = 20, most: int = 2000):
    """The decisions as the guardrail sees them: votes arriving `step` an arm at a time, a look after each batch,
    until a decision or `most` votes an arm. Returns (decision, votes an arm)."""
    rng = np.random.default_rng(seed)
    up_a = up_b = 0
    for n in range(step, most + 1, step):
        up_a, up_b = up_a + rng.binomial(step, p_a), up_b + rng.binomial(step, p_b)
        decision = decide(*_arms(up_a, n, up_b, n), FAST, T0 + HOUR, T0)
        if decision.action != "none":
            return decision, n
    return decision, most


def test_simulated_users_ten_points_apart_promote_or_roll_back():
    for seed in range(10):
        better, n_better = _look_as_votes_arrive(0.45, 0.55, seed)
        worse, n_worse = _look_as_votes_arrive(0.55, 0.45, seed)
        assert (better.action, worse.action) == ("promote", "rollback"), (seed, better.reason, worse.reason)
        assert 200 <= n_better <= 1000 and 200 <= n_worse <= 1000


def test_equal_arms_are_not_promoted():
    for seed in range(10):
        decision, n = _look_as_votes_arrive(0.5, 0.5, seed)
        # A rollback is harmless for equal arms (the experiment is over); a promotion would not be.
        assert decision.action != "promote", (seed, n, decision.reason)


def _clustered(arm: str, request_rates, seed: int, k: int = 4) -> ArmStats:
    """An arm's votes as serving gathers them: k votes on each request's images, which share its prompt's
    chance of a thumbs-up (prompt difficulty spans 0..1 in the shapes world: counts fail, colors pass)."""
    rng = np.random.default_rng(seed)
    stats = ArmStats(arm, f"v00000{1 if arm == 'A' else 2}")
    for r, p in enumerate(request_rates):
        for _ in range(k):
            stats.add_vote(f"{arm}-req-{r}", bool(rng.random() < p))
    return stats


def test_the_design_effect_counts_votes_that_agree_within_a_request_as_fewer():
    rng = np.random.default_rng(0)
    independent = _clustered("A", [0.5] * 200, seed=1)  # one rate for every request: votes as good as independent
    assert 1.0 <= independent.design_effect < 1.3
    same_verdict = _clustered("A", rng.integers(0, 2, 200).astype(float), seed=2)  # a request's votes all agree
    assert 3.5 < same_verdict.design_effect < 4.5  # k = 4 votes worth one
    # 10 requests an arm whose 4 votes agree: 16/40 vs 28/40 looks decisive vote by vote, and is not request by
    # request (the quick experiment promoted a 3-step adapter on such counts).
    a, b = _clustered("A", [1.0] * 4 + [0.0] * 6, seed=3), _clustered("B", [1.0] * 7 + [0.0] * 3, seed=4)
    config = GuardrailConfig(min_votes=20, draws=20_000)
    assert decide(*_arms(a.up, a.votes, b.up, b.votes), config, T0 + HOUR, T0).action == "promote"
    clustered = decide(a, b, config, T0 + HOUR, T0)
    assert clustered.action == "none" and clustered.numbers["b"]["design_effect"] > 3


def _promotions_of_equal_arms(seeds, by_request: bool) -> int:
    """Runs (of `seeds`) that promote B over an equal A: each request's 4 votes share a prompt difficulty drawn
    from U(0, 1), a look every 5 requests (20 votes) an arm, up to 250 requests; votes counted by request (the
    design effect) or as if independent."""
    promoted = 0
    for seed in seeds:
        rng = np.random.default_rng(100 + seed)
        rates_a, rates_b = rng.uniform(0, 1, 250), rng.uniform(0, 1, 250)
        for looks in range(5, 251, 5):
            a, b = _clustered("A", rates_a[:looks], seed), _clustered("B", rates_b[:looks], seed + 1000)
            arms = (a, b) if by_request else _arms(a.up, a.votes, b.up, b.votes)
            decision = decide(*arms, FAST, T0 + HOUR, T0)
            if decision.action != "none":
                promoted += decision.action == "promote"
                break
    return promoted


def test_equal_arms_with_clustered_votes_are_promoted_far_less_often_counted_by_request():
    """Over these 40 seeded runs: 11 promotions counted vote by vote, 5 by request. Multiple looks keep the second
    above the 1% one look would give; the guardrail's docstring has the larger simulation."""
    seeds = range(40)
    by_request, by_vote = _promotions_of_equal_arms(seeds, True), _promotions_of_equal_arms(seeds, False)
    assert 2 * by_request <= by_vote, (by_request, by_vote)


def test_a_users_votes_are_one_cluster_and_a_changed_vote_replaces_the_first(tmp_path):
    """Arms are sticky per user, so a user's votes over all their requests are one cluster of the design effect
    (anonymous votes: their request's); a user who votes up, then down, then up on one image counts once, up."""
    from alignloop.guardrail import Guardrail

    guardrail = Guardrail(Registry(tmp_path / "registry"), "127.0.0.1:1")
    guardrail.rollout = type("CountingSince", (), {"started_at": T0})()  # _count reads only its start
    guardrail.stats = {"A": ArmStats("A", "base"), "B": ArmStats("B", "v000001")}
    alice = "a" * 64

    def vote(request, image, up, user=alice):
        guardrail._count(FeedbackEvent(request_id=request, image_id=image, vote="up" if up else "down",
                                       user_hash=user, arm="B", adapter_version="v000001",
                                       image_uri=f"file:///images/{image}.png"))

    for r in range(10):  # 10 requests, 4 images each, every vote up
        for i in range(4):
            vote(f"r{r}", f"r{r}-{i}", True)
    vote("r0", "r0-0", False)
    b = guardrail.stats["B"]
    assert (b.up, b.down, b.clusters) == (39, 1, {alice: [39, 40]})
    vote("r0", "r0-0", True)
    assert (b.up, b.down, b.clusters) == (40, 0, {alice: [40, 40]})
    for i in range(2):  # anonymous: one cluster a request
        vote("anon-1", f"anon-1-{i}", False, user=None)
    assert b.clusters["anon-1"] == [0, 2] and b.votes == 42 and b.summary()["clusters"] == 2


def test_no_decision_below_the_minimum_sample():
    config = GuardrailConfig(min_votes=200, draws=20_000)
    decision = decide(*_arms(20, 199, 190, 400), config, T0 + HOUR, T0)  # B far ahead, A one vote short
    assert decision.action == "none"
    assert decision.reason == "waiting for votes: A 199, B 400 of 200 each"
    assert "p_b_beats_a" not in decision.numbers
    assert decide(*_arms(20, 200, 190, 400), config, T0 + HOUR, T0).action == "promote"


def test_reward_hacking_rolls_back_and_says_so():
    rng = np.random.default_rng(0)
    a, b = _arms(150, 300, 126, 300)  # users: 0.50 vs 0.42
    _rewards(a, rng.normal(0.40, 0.1, 600))
    _rewards(b, rng.normal(0.70, 0.1, 600))  # the reward model: B far better
    _rewards(a, rng.normal(0.9, 0.1, 50), model="clip")  # another reward model, fewer images: not the one compared
    decision = decide(a, b, FAST, T0 + HOUR, T0)
    assert decision.action == "rollback"
    assert decision.reason.startswith("reward hacking suspected: reward model v000004 scores B above A (0.69")
    assert "while users like B less, P(B<A)=0.9" in decision.reason
    assert decision.numbers["reward"]["model"] == "v000004" and decision.numbers["reward"]["effect_sd"] > 2

    # The same rewards with users liking B as much: no hacking, nothing to decide yet.
    a2, b2 = _arms(150, 300, 150, 300)
    a2.rewards, b2.rewards = a.rewards, b.rewards
    assert decide(a2, b2, FAST, T0 + HOUR, T0).action == "none"
    # Users like B a bit less (P(B<A) ~ 0.8 < 0.9), rewards alike: no rule fires.
    a3, b3 = _arms(150, 300, 142, 300)
    _rewards(a3, rng.normal(0.5, 0.1, 600))
    _rewards(b3, rng.normal(0.5, 0.1, 600))
    assert decide(a3, b3, FAST, T0 + HOUR, T0).action == "none"


def test_max_exposure_retires_b_as_inconclusive():
    config = GuardrailConfig(max_exposure_s=24 * 3600, draws=20_000)
    late = T0 + timedelta(hours=25)
    decision = decide(*_arms(250, 500, 252, 500), config, late, T0)
    assert decision.action == "rollback" and decision.reason.startswith("inconclusive after 25.0 h: P(B>A)=0.5")
    few = decide(*_arms(10, 20, 12, 20), config, late, T0)
    assert few.action == "rollback"
    assert few.reason.startswith("inconclusive after 25.0 h: too few votes (A 20, B 20, 200 needed each)")
    assert decide(*_arms(250, 500, 252, 500), config, T0 + timedelta(hours=23), T0).action == "none"


def test_config_is_checked():
    with pytest.raises(ValueError, match="promote_probability must be in \\(0.5, 1\\], got 0.3"):
        GuardrailConfig(promote_probability=0.3)
    with pytest.raises(ValueError, match="min_votes must be an integer >= 1, got 0"):
        GuardrailConfig(min_votes=0)


def test_watch_refuses_bad_flags_and_an_unreachable_broker(tmp_path, capsys):
    base = ["rollout", "watch", "--once", "--registry", str(tmp_path / "registry")]
    assert main(base + ["--bootstrap", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == ("alignloop: error: no Kafka broker answers at 127.0.0.1:1; start one with "
                                       "`alignloop kafka up`\n")
    assert main(base + ["--min-votes", "0"]) == 2
    assert capsys.readouterr().err == "alignloop: error: --min-votes must be an integer >= 1, got 0\n"


# -- against the real broker --------------------------------------------------------------------------------


def _lora() -> bytes:
    return save({"unet.mid_block.attentions.0.to_q.lora_A.weight": torch.full((4, 8), 0.01)})


def _vote(arm: str, adapter: str, vote: str, ts=None) -> FeedbackEvent:
    image = f"img-{uuid.uuid4().hex[:12]}"
    fields = dict(request_id=f"req-{image}", image_id=image, vote=vote, arm=arm, adapter_version=adapter,
                  image_uri=f"file:///images/{image}.png")
    return FeedbackEvent(**fields, **({"ts": ts} if ts else {}))


def _votes(arm: str, adapter: str, up: int, total: int) -> list:
    return [_vote(arm, adapter, "up" if i < up else "down") for i in range(total)]


def _generation(arm: str, adapter: str, rewards) -> GenerationEvent:
    request = f"req-{uuid.uuid4().hex[:12]}"
    images = [GeneratedImage(image_id=f"{request}-{i}", uri=f"file:///images/{request}-{i}.png", rank=i + 1,
                             reward=float(r), candidate_index=i, seed=i, shown_probability=1.0)
              for i, r in enumerate(rewards)]
    return GenerationEvent(request_id=request, prompt="two red squares", arm=arm, adapter_version=adapter,
                           params=GenerationParams(n=len(images), k=len(images), steps=10, guidance=5.0, seed=1),
                           images=images, reward_model="v000001")


def test_a_start_that_fails_is_tried_again_whole_at_the_next_look(kafka_broker, tmp_path):
    """The topics are not there yet when a canary is first seen (e.g. created by the deployment after the guardrail
    started): the look fails, and the guardrail keeps no rollout and no half-made consumer, so every next look starts
    over (it used to keep the rollout, and then counted nothing from no partitions, for good)."""
    from alignloop.feedback.config import Topics
    from alignloop.guardrail import Guardrail, GuardrailError

    reg = Registry(tmp_path / "registry")
    v1 = rollout.publish_adapter(reg, {rollout.ADAPTER_FILE: _lora()}, who="trainer", why="rwr").version
    rollout.start_canary(reg, v1, 0.5, who="nightly", why="try v1")
    guardrail = Guardrail(reg, kafka_broker.bootstrap, Topics().prefixed(f"absent-{uuid.uuid4().hex[:8]}-"))
    for _ in range(2):
        with pytest.raises(GuardrailError, match="does not exist"):
            guardrail.step()
        assert guardrail.rollout is None and guardrail._consumer is None


def test_watch_once_promotes_then_catches_reward_hacking(kafka_broker, kafka_topics, tmp_path, capsys):
    url = str(tmp_path / "registry")
    reg = Registry(url)
    v1, v2, v3 = (rollout.publish_adapter(reg, {rollout.ADAPTER_FILE: _lora()}, who="trainer", why="rwr").version
                  for _ in range(3))
    rollout.promote(reg, v1, who="op", why="first")
    first = rollout.start_canary(reg, v2, 0.5, who="nightly", why="try v2")
    prefix = kafka_topics.feedback[: -len(FEEDBACK_TOPIC)]
    argv = ["rollout", "watch", "--once", "--bootstrap", kafka_broker.bootstrap, "--topic-prefix", prefix,
            "--registry", url, "--min-votes", "100", "--draws", "20000"]

    # 1. A promotion: B 0.60 vs A 0.45, 200 votes each. Around them, what must not count: votes from before the
    #    rollout, for another arm or adapter, a duplicate (a replayed spool), and a malformed record.
    votes = _votes("A", v1, 90, 200) + _votes("B", v2, 120, 200)
    noise = [_vote("B", v2, "down", ts=first.started_at - timedelta(seconds=5)) for _ in range(100)]
    noise += [_vote("B", v3, "down") for _ in range(100)] + [_vote("C", v2, "down") for _ in range(100)]
    with EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool", topics=kafka_topics) as producer:
        for event in noise + votes + votes[-50:]:
            producer.emit(event)
        assert producer.flush(60)
    bare = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    bare.send(kafka_topics.feedback, value=b'{"schema": "alignloop.feedback/1", "vote": "sideways"}')
    bare.flush()
    bare.close()

    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["action"] == "promote" and record["rollout"] == first.id and record["who"] == "guardrail"
    assert (record["numbers"]["a"]["up"], record["numbers"]["a"]["down"]) == (90, 110)
    assert (record["numbers"]["b"]["up"], record["numbers"]["b"]["down"]) == (120, 80)
    promoted = rollout.current_rollout(reg)
    assert [(a.name, a.adapter, a.share) for a in promoted.arms] == [("A", v2, 1.0)]
    assert promoted.id == record["new_rollout"] and promoted.numbers == record["numbers"]
    assert reg.get("adapter", v2).state == "live" and reg.get("adapter", v1).state == "retired"
    assert reg.get("adapter", v2).history[-1].why.startswith("guardrail: B is better: P(B>A)=")
    assert reg.get("adapter", v2).history[-1].who == "guardrail"

    # 2. Nothing to judge without a canary.
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"action": "none", "reason": "no canary in the current rollout"}

    # 3. Reward hacking: the reward model scores B's images far above A's while users vote B down.
    second = rollout.start_canary(reg, v3, 0.5, who="nightly", why="try v3")
    rng = np.random.default_rng(0)
    events = _votes("A", v2, 110, 200) + _votes("B", v3, 80, 200)
    events += [_generation("A", v2, rng.normal(0.4, 0.1, 2)) for _ in range(100)]
    events += [_generation("B", v3, rng.normal(0.8, 0.1, 2)) for _ in range(100)]
    with EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool", topics=kafka_topics) as producer:
        for event in events:
            producer.emit(event)
        assert producer.flush(60)
    lines = []
    decision = watch(kafka_broker.bootstrap, kafka_topics, url, GuardrailConfig(min_votes=100, draws=20_000),
                     once=True, emit=lines.append)
    assert decision.action == "rollback" and decision.reason.startswith("reward hacking suspected: reward model v000001")
    assert json.loads(lines[0])["rollout"] == second.id
    after = rollout.current_rollout(reg)
    assert [(a.name, a.adapter) for a in after.arms] == [("A", v2)] and after.numbers["reward"]["mean_b"] > 0.7
    assert reg.get("adapter", v3).state == "retired" and reg.get("adapter", v2).state == "live"
    assert reg.get("adapter", v3).reason.startswith("rolled back: guardrail: reward hacking suspected")


def test_watch_keeps_watching_and_rolls_back_when_the_votes_arrive(kafka_broker, kafka_topics, tmp_path):
    url = str(tmp_path / "registry")
    reg = Registry(url)
    v1 = rollout.publish_adapter(reg, {rollout.ADAPTER_FILE: _lora()}, who="trainer", why="rwr").version
    canary = rollout.start_canary(reg, v1, 0.5, who="nightly", why="try v1")  # against the base model
    stop, lines = threading.Event(), []
    watcher = threading.Thread(target=watch, args=(kafka_broker.bootstrap, kafka_topics, url),
                               kwargs=dict(config=GuardrailConfig(min_votes=100, draws=20_000, poll_s=0.2),
                                           emit=lines.append, stop=stop))
    watcher.start()
    try:
        time.sleep(1)  # a few looks at no votes: nothing is decided, nothing emitted
        assert lines == [] and rollout.current_rollout(reg) == canary
        with EventProducer(kafka_broker.bootstrap, spool_dir=tmp_path / "spool", topics=kafka_topics) as producer:
            for event in _votes("A", "base", 120, 200) + _votes("B", v1, 70, 200):
                producer.emit(event)
            assert producer.flush(60)
        deadline = time.monotonic() + 60
        while rollout.current_rollout(reg).id == canary.id:
            assert time.monotonic() < deadline, "the guardrail did not decide"
            time.sleep(0.2)
    finally:
        stop.set()
        watcher.join(30)
    assert not watcher.is_alive()
    assert [json.loads(line)["action"] for line in lines] == ["rollback"]
    assert [(a.adapter, a.share) for a in rollout.current_rollout(reg).arms] == [("base", 1.0)]
    assert reg.get("adapter", v1).state == "retired"


def test_every_guardrail_flag_says_what_it_is():
    import dataclasses

    from alignloop.rollout_cli import _GUARDRAIL_HELP

    assert set(_GUARDRAIL_HELP) == {f.name for f in dataclasses.fields(GuardrailConfig)}
