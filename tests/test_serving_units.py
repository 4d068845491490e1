"""Units of the serving stage with in-memory fakes: tokens, schemas, arms, vote ledger, batcher, sampler, core."""

import collections
import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from alignloop.events import FeedbackEvent, GenerationEvent
from alignloop.feedback.producer import MemorySink
from alignloop.serving import tokens
from alignloop.serving.arms import assign_arm
from alignloop.serving.batching import DiffusionBatcher
from alignloop.serving.config import ArmSpec, ServingConfig
from alignloop.serving.handlers import ServingCore
from alignloop.serving.reward_slot import RewardSlot
from alignloop.serving.sampler import Sampler, candidate_seeds, choose_shown
from alignloop.serving.schemas import FeedbackRequest, GenerateRequest
from alignloop.serving.votes import MemoryLedger, SqliteLedger

KEY = b"k" * 32


# -- tokens ---------------------------------------------------------------------------------------------------

def _claims(**changes):
    base = dict(image_id="img-1", request_id="req-1", prompt_sha=tokens.prompt_hash("p"), arm="A", adapter="base",
                expires_at=int(time.time()) + 60)
    return tokens.TokenClaims(**{**base, **changes})


def test_token_round_trip():
    claims = _claims()
    assert tokens.verify(KEY, tokens.mint(KEY, claims)) == claims


@pytest.mark.parametrize("token, reason", [
    ("", "malformed"), ("v1", "malformed"), ("v2.a.b", "malformed"), ("v1..sig", "malformed"),
    ("v1.e30.not*base64", "malformed"), ("v1.e30.c2hvcnQ", "malformed"), ("x" * 5000, "malformed"),
])
def test_malformed_tokens(token, reason):
    with pytest.raises(tokens.TokenError) as err:
        tokens.verify(KEY, token)
    assert err.value.reason == reason


def _reason(keys, token):
    with pytest.raises(tokens.TokenError) as err:
        tokens.verify(keys, token)
    return err.value.reason


def test_forged_tampered_and_expired_tokens():
    token = tokens.mint(KEY, _claims())
    assert _reason(b"other-key", token) == "unknown_key"  # signed by a key the verifier does not hold
    version, kid, payload, signature = token.split(".")
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    assert _reason(KEY, f"{version}.{kid}.{flipped}.{signature}") == "bad_signature"
    forged = tokens.mint(b"other-key", _claims()).split(".")  # another key's signature under our key id
    assert _reason(KEY, ".".join([version, kid, *forged[2:]])) == "bad_signature"
    expired = tokens.mint(KEY, _claims(expires_at=1000))
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(KEY, expired)
    # Expiry is checked only after the signature: an expired forgery is a bad signature, not "expired".
    _, _, expired_payload, _ = expired.split(".")
    assert _reason(KEY, f"{version}.{kid}.{expired_payload}.{signature}") == "bad_signature"


def test_key_rotation_accepts_the_previous_key_until_it_is_retired():
    old, new = b"o" * 32, b"n" * 32
    before = tokens.mint(old, _claims())
    rotated = tokens.Keyring(new, (old,))
    after = tokens.mint(rotated, _claims(image_id="img-2"))
    assert after.split(".")[1] == tokens.key_id(new) != before.split(".")[1] == tokens.key_id(old)
    assert tokens.verify(rotated, before).image_id == "img-1"  # old tokens still count during the rotation
    assert tokens.verify(rotated, after).image_id == "img-2"
    assert _reason(tokens.Keyring(new), before) == "unknown_key"  # the previous key removed: refused


def test_default_keys_read_the_previous_key_only_when_it_is_set(monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_FEEDBACK_TOKEN_KEY", "current-key")
    monkeypatch.delenv("ALIGNLOOP_FEEDBACK_TOKEN_KEY_PREVIOUS", raising=False)
    tokens.default_keys.cache_clear()
    try:
        assert tokens.default_keys() == tokens.Keyring(b"current-key")
        monkeypatch.setenv("ALIGNLOOP_FEEDBACK_TOKEN_KEY_PREVIOUS", "old-key")
        tokens.default_keys.cache_clear()
        assert tokens.default_keys() == tokens.Keyring(b"current-key", (b"old-key",))
    finally:
        tokens.default_keys.cache_clear()


# -- schemas --------------------------------------------------------------------------------------------------

def test_generate_request_defaults_and_trimming():
    req = GenerateRequest.model_validate_json('{"prompt": "  two blue squares  "}')
    assert (req.prompt, req.n, req.k, req.steps, req.guidance, req.seed, req.user_id) == (
        "two blue squares", 8, 2, None, None, None, None)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "n": 2, "k": 3}, "k"), ({"prompt": "a" * 501}, "prompt"), ({"prompt": "a", "guidance": -1}, "guidance"),
    ({"prompt": "a", "seed": 2**63}, "seed"), ({"prompt": "a", "extra": 1}, "extra"), ({"prompt": "a", "n": True}, "n"),
])
def test_generate_request_bounds_name_the_field(body, field):
    with pytest.raises(ValidationError) as err:
        GenerateRequest.model_validate(body)
    assert err.value.errors()[0]["loc"] == (field,)


def test_feedback_request_rejects_unknown_votes():
    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate({"feedback_token": "t", "vote": "meh"})


# -- arms and ledger -------------------------------------------------------------------------------------------

def test_arm_is_sticky_by_user_and_follows_shares():
    arms = (ArmSpec("A", "base", 0.8), ArmSpec("B", "v2", 0.2))
    hashes = [f"{i:064x}" for i in range(2000)]
    first = [assign_arm(h, arms) for h in hashes]
    assert first == [assign_arm(h, arms) for h in hashes]
    share_b = sum(a.name == "B" for a in first) / len(first)
    assert 0.15 < share_b < 0.25
    assert assign_arm(None, ServingConfig().arms).name == "A"


@pytest.mark.parametrize("make", [lambda tmp: MemoryLedger(), lambda tmp: SqliteLedger(tmp / "votes.sqlite", 3600)])
def test_vote_ledger_idempotency(tmp_path, make):
    ledger = make(tmp_path)
    assert ledger.record("img-1", "u1", "up", "e1") == ("e1", True)
    assert ledger.record("img-1", "u1", "up", "e2") == ("e1", False)  # replay: the first id, nothing new
    assert ledger.record("img-1", "u2", "up", "e3") == ("e3", True)  # another user
    assert ledger.record("img-1", "u1", "down", "e4") == ("e4", True)  # a changed vote is new
    assert ledger.record("img-1", "u1", "down", "e5") == ("e4", False)


def test_sqlite_ledger_is_shared_between_instances(tmp_path):
    a, b = SqliteLedger(tmp_path / "v.sqlite", 3600), SqliteLedger(tmp_path / "v.sqlite", 3600)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append((a if i % 2 else b).record("img", "u", "up", f"e{i}")))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(new for _, new in results) == 1 and len({event for event, _ in results}) == 1


# -- batcher and sampler with a fake pipeline -------------------------------------------------------------------

class FakePipeline:
    """Each image is noise from its own generator, shifted by its prompt's length: like a real pipeline, the
    output depends on (prompt, seed) only. Records the prompts of every pass."""

    def __init__(self, delay_s=0.0):
        self.calls = []
        self.delay_s = delay_s

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, output_type, **unused):
        assert len(prompt) == len(generator) and output_type == "pt"
        self.calls.append((list(prompt), num_inference_steps, guidance_scale))
        time.sleep(self.delay_s)
        images = torch.stack([torch.rand(3, 4, 4, generator=g) * 0.5 + (len(p) % 5) / 10 for p, g in zip(prompt, generator)])
        return SimpleNamespace(images=images)


def test_batcher_shares_passes_across_requests_and_splits_large_ones():
    pipe = FakePipeline(delay_s=0.05)
    batcher = DiffusionBatcher(pipe, max_batch_images=8, wait_ms=20)
    try:
        futures = [batcher.submit(f"prompt {i}", candidate_seeds(i, 3), 4, 7.5) for i in range(3)]  # 9 images
        big = batcher.submit("big", candidate_seeds(9, 10), 4, 7.5)
        other = batcher.submit("other guidance", candidate_seeds(5, 2), 4, 3.0)
        results = [f.result(timeout=10) for f in futures + [big, other]]
    finally:
        batcher.close()
    assert [r.images.shape[0] for r in results] == [3, 3, 3, 10, 2]
    assert all(len(call[0]) <= 8 for call in pipe.calls)
    assert len(pipe.calls) < 5  # 3 + 3 + 3 + 10 images at guidance 7.5 need 3 passes of <= 8, plus 1 at 3.0
    assert [c for c in pipe.calls if c[2] == 3.0] == [(["other guidance"] * 2, 4, 3.0)]  # its own schedule


def test_batcher_results_do_not_depend_on_batching():
    seeds = candidate_seeds(42, 6)
    outputs = []
    for max_batch, cross in ((1, False), (4, True), (64, True)):
        batcher = DiffusionBatcher(FakePipeline(), max_batch_images=max_batch, wait_ms=10, cross_request=cross)
        try:
            noise = batcher.submit("noise", candidate_seeds(1, 5), 4, 7.5)
            mine = batcher.submit("three red circles", seeds, 4, 7.5)
            outputs.append(mine.result(timeout=10).images)
            noise.result(timeout=10)
        finally:
            batcher.close()
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_batcher_without_cross_request_batching_runs_one_request_per_pass():
    pipe = FakePipeline(delay_s=0.02)
    batcher = DiffusionBatcher(pipe, max_batch_images=64, wait_ms=20, cross_request=False)
    try:
        futures = [batcher.submit(f"p{i}", candidate_seeds(i, 4), 4, 7.5) for i in range(4)]
        [f.result(timeout=10) for f in futures]
    finally:
        batcher.close()
    assert [len(call[0]) for call in pipe.calls] == [4, 4, 4, 4]


def test_batcher_failure_fails_only_that_pass():
    class Flaky(FakePipeline):
        def __call__(self, prompt, **kw):
            if "boom" in prompt:
                raise RuntimeError("CUDA out of memory")
            return super().__call__(prompt, **kw)

    batcher = DiffusionBatcher(Flaky(), max_batch_images=4, wait_ms=0, cross_request=False)
    try:
        bad = batcher.submit("boom", [1, 2, 3, 4, 5, 6], 4, 7.5)
        good = batcher.submit("fine", [7], 4, 7.5)
        with pytest.raises(RuntimeError, match="out of memory"):
            bad.result(timeout=10)
        assert good.result(timeout=10).images.shape[0] == 1
    finally:
        batcher.close()


class MeanScorer:
    """Reward = mean pixel value: a deterministic stand-in for RewardScorer."""

    def score(self, images, prompt):
        return images.float().mean(dim=(1, 2, 3))


def test_sampler_returns_the_best_k_in_order():
    batcher = DiffusionBatcher(FakePipeline(), max_batch_images=16, wait_ms=0)
    try:
        best = Sampler(batcher, RewardSlot(MeanScorer())).sample("p", n=10, k=3, steps=4, guidance=7.5, seed=7)
    finally:
        batcher.close()
    assert len(best.candidate_rewards) == 10 and len(best.rewards) == 3
    assert best.rewards == sorted(best.candidate_rewards, reverse=True)[:3]
    assert [best.candidate_rewards[i] for i in best.indices] == best.rewards
    assert torch.allclose(best.images.mean(dim=(1, 2, 3)), torch.tensor(best.rewards))
    assert best.seeds == [candidate_seeds(7, 10)[i] for i in best.indices]
    assert best.shown_probabilities == [1.0] * 3 and not best.explored and best.reward_model == "clip"


def test_exploration_shows_a_lower_ranked_candidate_with_its_probability():
    rewards = torch.arange(10, dtype=torch.float32)  # candidate 9 is the best
    always = choose_shown(rewards, 3, 1.0, random.Random(0))
    assert always[0][:2] == [9, 8] and always[0][2] in range(8) and always[2] is True
    assert always[1] == [1.0, 1.0, pytest.approx(1 / 8)]  # the pool is the 3rd best and the 7 below it
    never = choose_shown(rewards, 3, 0.0, random.Random(0))
    assert never == ([9, 8, 7], [1.0, 1.0, 1.0], False)
    assert choose_shown(rewards, 10, 1.0, random.Random(0))[2] is False  # k = n: nothing to explore
    # Over many requests, each candidate below the top k-1 is shown at the rate its probability says.
    rng, p, shown = random.Random(1), 0.5, collections.Counter()
    for _ in range(8000):
        indices, probabilities, _ = choose_shown(rewards, 3, p, rng)
        shown[indices[2]] += 1
        assert probabilities[2] == pytest.approx(p / 8 + (1 - p) * (indices[2] == 7))
    assert shown[7] / 8000 == pytest.approx(1 - p + p / 8, abs=0.02)
    assert shown[0] / 8000 == pytest.approx(p / 8, abs=0.015)


def test_seeded_requests_explore_the_same_way():
    batcher = DiffusionBatcher(FakePipeline(), max_batch_images=16, wait_ms=0)
    try:
        sampler = Sampler(batcher, RewardSlot(MeanScorer()), explore_probability=0.5)
        runs = [[sampler.sample("p", n=8, k=2, steps=4, guidance=7.5, seed=s).indices for s in range(12)]
                for _ in range(2)]
        explored = [sampler.sample("p", n=8, k=2, steps=4, guidance=7.5, seed=s).explored for s in range(40)]
    finally:
        batcher.close()
    assert runs[0] == runs[1]
    assert 5 < sum(explored) < 35  # about half


@pytest.mark.parametrize("kwargs", [dict(n=2, k=3), dict(n=65, k=1), dict(n=4, k=0), dict(n=4, k=1, seed=-1)])
def test_sampler_checks_inputs(kwargs):
    sampler = Sampler(source=None, reward=RewardSlot(MeanScorer()))
    with pytest.raises(ValueError):
        sampler.sample("p", steps=4, guidance=7.5, **{"seed": None, **kwargs})


# -- ServingCore with fakes -------------------------------------------------------------------------------------

class DictStore:
    def __init__(self):
        self.blobs = {}

    def uri(self, image_id):
        return f"memory://images/{image_id}.png"

    def put(self, image_id, png):
        self.blobs[image_id] = png
        return self.uri(image_id)


@pytest.fixture
def core():
    batcher = DiffusionBatcher(FakePipeline(), max_batch_images=16, wait_ms=0)
    clock = SimpleNamespace(now=time.time())
    core = ServingCore(Sampler(batcher, RewardSlot(MeanScorer())), MemorySink(), DictStore(), MemoryLedger(), KEY,
                       ServingConfig(token_ttl_s=60), clock=lambda: clock.now)
    core.test_clock = clock
    yield core
    batcher.close()


def test_core_generate_stores_emits_and_signs(core):
    result = core.generate(GenerateRequest(prompt="two blue squares", n=5, k=2, seed=3, user_id="carol"))
    [event] = core.sink.events
    assert isinstance(event, GenerationEvent) and event.request_id == result.request_id
    assert event.user_hash and event.user_hash != "carol" and len(event.candidate_rewards) == 5
    assert event.schema_ == "alignloop.generation/2" and event.reward_model == result.reward_model == "clip"
    assert [(im.candidate_index, im.seed) for im in event.images] == [(im.candidate_index, im.seed) for im in result.images]
    assert set(core.store.blobs) == {im.image_id for im in result.images}
    assert [im.rank for im in result.images] == [1, 2]
    claims = tokens.verify(KEY, result.images[0].feedback_token)
    assert claims.expires_at == pytest.approx(core.test_clock.now + 60, abs=2)


def test_core_feedback_dedupes_and_expires(core):
    result = core.generate(GenerateRequest(prompt="two blue squares", n=2, k=1, user_id="dave"))
    token = result.images[0].feedback_token
    first = core.feedback(FeedbackRequest(feedback_token=token, vote="up", user_id="dave"))
    again = core.feedback(FeedbackRequest(feedback_token=token, vote="up", user_id="dave"))
    assert (first.status, again.status, again.event_id) == ("accepted", "duplicate", first.event_id)
    votes = [e for e in core.sink.events if isinstance(e, FeedbackEvent)]
    assert len(votes) == 1 and votes[0].image_uri == core.store.uri(result.images[0].image_id)
    core.test_clock.now += 61
    with pytest.raises(tokens.TokenError) as err:
        core.feedback(FeedbackRequest(feedback_token=token, vote="down", user_id="dave"))
    assert err.value.reason == "expired"


class _StuckOnce(MemorySink):
    """A producer whose inbox is full for the first vote: it drops that event, as EventProducer does."""

    def __init__(self):
        super().__init__()
        self.drop_next_vote = True

    def emit(self, event):
        if isinstance(event, FeedbackEvent) and self.drop_next_vote:
            self.drop_next_vote = False
            return False
        return super().emit(event)


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
def test_a_vote_the_producer_dropped_is_not_recorded_so_its_retry_is_emitted(core, tmp_path, ledger):
    from alignloop.serving.handlers import VoteNotQueued
    from alignloop.serving.votes import SqliteLedger

    core.sink = _StuckOnce()
    if ledger == "sqlite":
        core.ledger = SqliteLedger(tmp_path / "votes.sqlite", retention_s=3600)
    token = core.generate(GenerateRequest(prompt="two blue squares", n=2, k=1, user_id="ivan")).images[0].feedback_token
    with pytest.raises(VoteNotQueued):
        core.feedback(FeedbackRequest(feedback_token=token, vote="up", user_id="ivan"))
    retry = core.feedback(FeedbackRequest(feedback_token=token, vote="up", user_id="ivan"))
    assert retry.status == "accepted"  # not a "duplicate" of a vote that never reached the stream
    votes = [e for e in core.sink.events if isinstance(e, FeedbackEvent)]
    assert [str(v.event_id) for v in votes] == [retry.event_id]


def test_config_round_trips_through_the_environment():
    config = ServingConfig(workers=2, max_batch_images=32, cross_request_batching=False, default_guidance=5.0)
    assert ServingConfig.from_env(config.to_env()) == config
    with pytest.raises(ValueError, match="ALIGNLOOP_SERVE_WORKERS"):
        ServingConfig.from_env({"ALIGNLOOP_SERVE_WORKERS": "two"})


# -- identity, token binding, limits, the queue bound, the OpenAPI document --------------------------------------

def test_identity_resolution_order():
    from alignloop.serving.arms import ANON_COOKIE, mint_anon_cookie
    from alignloop.serving.identity import Identity, IdentityError, resolve_identity

    cookie = {ANON_COOKIE: mint_anon_cookie()}
    # No header configured: the body's user id, else the signed cookie, else nobody.
    assert resolve_identity("", {}, cookie, "alice") == Identity(user_id="alice")
    anonymous = resolve_identity("", {}, cookie, None)
    assert anonymous.user_id is None and anonymous.anon_id and anonymous.user_hash is None
    assert resolve_identity("", {}, {ANON_COOKIE: "forged"}, None) == Identity()
    # Header configured: the header, the body ignored; without the header, 401.
    assert resolve_identity("X-User", {"X-User": "bob"}, cookie, "mallory") == Identity(user_id="bob")
    for headers in ({}, {"X-User": "two words"}):
        with pytest.raises(IdentityError):
            resolve_identity("X-User", headers, cookie, "alice")
    # Owners differ per identity, are not the event's user hash, and are empty only for nobody.
    owners = {Identity(user_id="alice").owner, Identity(user_id="bob").owner, anonymous.owner, Identity().owner}
    assert len(owners) == 4 and "" in owners and Identity(user_id="alice").user_hash not in owners


def test_core_refuses_a_token_voted_by_another_identity(core):
    from alignloop.serving.identity import Identity

    result = core.generate(GenerateRequest(prompt="two blue squares", n=2, k=1), Identity(user_id="erin"))
    token = result.images[0].feedback_token
    for other in ("frank", "grace", "heidi"):  # ballot stuffing under made-up ids
        with pytest.raises(tokens.TokenError) as err:
            core.feedback(FeedbackRequest(feedback_token=token, vote="down"), Identity(user_id=other))
        assert (err.value.reason, err.value.status) == ("other_identity", 403)
    with pytest.raises(tokens.TokenError):
        core.feedback(FeedbackRequest(feedback_token=token, vote="down"), Identity())  # nor anonymously
    assert core.feedback(FeedbackRequest(feedback_token=token, vote="down"), Identity(user_id="erin")).status == "accepted"
    assert len([e for e in core.sink.events if isinstance(e, FeedbackEvent)]) == 1


def test_rate_limiter_allows_the_burst_then_the_rate():
    from alignloop.serving.limits import RateLimiter

    clock = SimpleNamespace(now=100.0)
    limiter = RateLimiter(rate_per_s=0.5, burst=3, max_keys=2, clock=lambda: clock.now)
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("a") == pytest.approx(2.0)  # one request per 2 s
    assert limiter.acquire("b") == 0  # per key
    clock.now += 2.0
    assert limiter.acquire("a") == 0 and limiter.acquire("a") > 0
    limiter.acquire("c")
    assert len(limiter._buckets) == 2  # bounded: the least recently used key was dropped


def test_batcher_queue_is_bounded():
    from alignloop.serving.batching import QueueFull

    release = threading.Event()

    class Slow(FakePipeline):
        def __call__(self, prompt, **kw):
            release.wait(10)
            return super().__call__(prompt, **kw)

    batcher = DiffusionBatcher(Slow(), max_batch_images=4, wait_ms=0, max_queued_images=6)
    try:
        running = batcher.submit("first", [1, 2, 3, 4], 4, 7.5)  # taken into a pass at once
        deadline = time.monotonic() + 5
        while batcher._queue and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = batcher.submit("second", [5, 6, 7, 8], 4, 7.5)  # waits: 4 of 6 queued
        with pytest.raises(QueueFull) as err:
            batcher.submit("third", [9, 10, 11], 4, 7.5)
        assert err.value.retry_after_s >= 1 and "at capacity" in str(err.value)
        release.set()
        assert running.result(timeout=10) and queued.result(timeout=10)
        assert batcher.submit("big but alone", list(range(20)), 4, 7.5).result(timeout=10).images.shape[0] == 20
    finally:
        release.set()
        batcher.close()


def test_openapi_document_lists_the_real_responses():
    from alignloop.serving.openapi import document_responses

    ok = {"description": "Successful Response", "content": {"application/json": {"schema": {"$ref": "#/x"}}}}
    spec = {"paths": {"/generate": {"post": {"responses": {"200": ok, "404": {}}}},
                      "/feedback": {"post": {"responses": {"200": ok, "500": {}}}}}}
    spec = document_responses(spec)
    generate, feedback = (spec["paths"][p]["post"]["responses"] for p in ("/generate", "/feedback"))
    assert set(generate) == {"200", "400", "401", "413", "415", "429", "500", "503"}
    assert set(feedback) == {"202", "400", "401", "403", "413", "415", "429", "503"}
    assert feedback["202"]["content"] == ok["content"]
    assert generate["429"]["headers"]["Retry-After"]["required"] and "Retry-After" in feedback["503"]["headers"]
    assert spec["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]


def test_admission_answers_503_over_the_in_flight_bound_and_keys_limits_by_the_trusted_header():
    import asyncio

    from alignloop.serving.limits import AdmissionMiddleware

    async def scenario():
        release = asyncio.Event()

        async def app(scope, receive, send):
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        config = ServingConfig(max_concurrency=1, identity_header="X-User", generate_per_min=60, generate_burst=1)
        middleware = AdmissionMiddleware(app, config)

        async def call(user, client="10.0.0.1"):
            sent = []

            async def send(message):
                sent.append(message)
            scope = {"type": "http", "path": "/generate", "client": (client, 1234),
                     "headers": [(b"x-user", user.encode())]}
            await middleware(scope, None, send)
            return sent[0]["status"], dict(sent[0]["headers"])

        first = asyncio.create_task(call("ann"))
        await asyncio.sleep(0.01)  # ann's request is in flight
        status, headers = await call("ben")
        assert (status, headers[b"retry-after"]) == (503, b"1")
        release.set()
        assert (await first)[0] == 200
        status, headers = await call("ann", client="10.0.0.2")  # another address, the same user: limited
        assert status == 429 and int(headers[b"retry-after"]) >= 1
        assert (await call("cat"))[0] == 200  # the same address, another user: not

    asyncio.run(scenario())
