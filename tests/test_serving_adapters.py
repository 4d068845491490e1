"""Serving with adapters: sticky arms per rollout, the anonymous cookie, the config's arms in the environment,
the admin routes' token, rollout reconciliation in-process, and through real served services: two workers
converging on a new rollout within 2 s, and hot-swaps under load with every image checked against the adapter
it names."""

import base64
import io
import json
import os
import threading
import time
import uuid

import numpy as np
import pytest
import requests
from PIL import Image
from test_adapters import close, make_adapter, publish, reference_images

from alignloop import rollout
from alignloop.adapters import base_model_identity
from alignloop.registry import Registry
from alignloop.serving.arms import anon_id_from_cookie, assign_arm, mint_anon_cookie
from alignloop.serving.config import ArmSpec, ServingConfig

PROMPT = "three red circles on a gray background"
ADMIN_TOKEN = "test-admin-" + uuid.uuid4().hex


# -- arms, cookie, config ----------------------------------------------------------------------------------------

def test_each_rollout_reshuffles_who_is_in_b():
    arms = (ArmSpec("A", "v000001", 0.5), ArmSpec("B", "v000002", 0.5))
    users = [f"{i:064x}" for i in range(2000)]
    first = [assign_arm(u, arms, "v000010").name for u in users]
    assert first == [assign_arm(u, arms, "v000010").name for u in users]  # sticky within a rollout
    second = [assign_arm(u, arms, "v000011").name for u in users]
    moved = sum(a != b for a, b in zip(first, second)) / len(users)
    assert 0.4 < moved < 0.6  # independent draws: about half change arm


def test_anonymous_cookie_is_signed():
    key = b"c" * 32
    value = mint_anon_cookie(key)
    anon_id = anon_id_from_cookie(value, key)
    assert anon_id and len(anon_id) == 32
    assert anon_id_from_cookie(value, b"d" * 32) is None  # another key
    assert anon_id_from_cookie("0" * 32 + "." + value.split(".")[1], key) is None  # another id, same signature
    assert anon_id_from_cookie("garbage", key) is None and anon_id_from_cookie(None, key) is None
    # Whatever a client sends is refused, never raised on (hmac.compare_digest raises on non-ASCII strings).
    anon, signature = value.split(".")
    for odd in (f"{anon}.{signature[:-1]}\u00e9", f"{anon}.{signature.upper()}", f"{anon}.{signature}.x", value + " "):
        assert anon_id_from_cookie(odd, key) is None


def test_config_arms_reach_the_workers_through_the_environment():
    config = ServingConfig(arms=(ArmSpec("A", "v000003", 0.9), ArmSpec("B", "v000004", 0.1)), rollout_poll_s=0.25)
    assert ServingConfig.from_env(config.to_env()) == config
    with pytest.raises(ValueError, match="ALIGNLOOP_SERVE_ARMS"):
        ServingConfig.from_env({"ALIGNLOOP_SERVE_ARMS": "[{\"name\": \"A\"}]"})


# -- admin routes (in-process) ---------------------------------------------------------------------------------------

@pytest.fixture
def admin(tmp_path):
    from starlette.testclient import TestClient

    from alignloop.serving.admin import admin_app

    registry = Registry(tmp_path / "reg")
    app = admin_app(lambda: None, str(tmp_path / "reg"), max_upload_bytes=10_000_000, token=lambda: b"secret-token")
    return TestClient(app), registry


def test_admin_routes_need_the_token(admin):
    client, _ = admin
    for method, path in (("get", "/rollout"), ("post", "/rollout/rollback"), ("post", "/adapters"),
                         ("post", "/rollout/canary"), ("post", "/rollout/promote"), ("post", "/rollout/retire")):
        assert getattr(client, method)(path).status_code == 401
        wrong = getattr(client, method)(path, headers={"Authorization": "Bearer secret-tokem"})
        assert wrong.status_code == 401 and "admin token" in wrong.json()["error"]
    assert client.get("/rollout", headers={"Authorization": "Bearer secret-token"}).status_code == 200
    # The OpenAPI document (public) names the bearer scheme and the 401 on every route.
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["adminToken"] == {"type": "http", "scheme": "bearer"}
    operations = [(path, op) for path, item in spec["paths"].items() for op in item.values()]
    assert len(operations) == 6
    for path, op in operations:
        assert "401" in op["responses"] and op["security"] == [{"adminToken": []}], path
    assert {"400", "413"} <= set(spec["paths"]["/admin/adapters"]["post"]["responses"])


def test_a_slow_registry_write_does_not_hold_up_the_workers_other_requests(tmp_path, monkeypatch):
    """The admin routes' registry work runs on the thread pool: while a canary start waits on the store, the same
    event loop answers another request (run on the loop, it answered only after the write)."""
    import asyncio
    import threading

    import httpx

    from alignloop.serving.admin import admin_app

    store_answers = threading.Event()

    def slow_start_canary(*args, **kwargs):
        store_answers.wait(10)
        raise rollout.RolloutError("no such adapter")

    monkeypatch.setattr(rollout, "start_canary", slow_start_canary)
    app = admin_app(lambda: None, str(tmp_path / "reg"), max_upload_bytes=1000, token=lambda: b"secret-token")
    auth = {"Authorization": "Bearer secret-token"}

    async def both():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
            slow = asyncio.create_task(client.post("/rollout/canary", headers=auth,
                                                   json={"version": "v000001", "share": 0.1, "why": "try"}))
            await asyncio.sleep(0.2)
            other = await client.get("/openapi.json")
            answered_first = not slow.done()
            store_answers.set()
            return other.status_code, answered_first, (await slow).status_code

    assert asyncio.run(both()) == (200, True, 409)


def test_admin_publish_canary_promote_rollback(admin, tmp_path):
    from alignloop.models import load_generator

    client, registry = admin
    auth = {"Authorization": "Bearer secret-token"}
    unet = load_generator(device="cpu").unet
    folder, _ = make_adapter(unet, tmp_path / "a", seed=3)
    body = (folder / "pytorch_lora_weights.safetensors").read_bytes()
    sha = base_model_identity("shapes-sd-tiny")["unet_sha256"]
    bad = client.post("/adapters?why=test", content=body, headers=auth)
    assert bad.status_code == 400 and "base_unet_sha256" in bad.json()["error"]
    assert client.post(f"/adapters?why=x&base_unet_sha256={sha}", content=b"junk", headers=auth).status_code == 400
    # A file with diffusers' LoRA header but NaN weights, or a header whose metadata is no object: 400, nothing written.
    from safetensors.torch import load, save

    from alignloop.adapters import METADATA_KEY, _read_header

    header = _read_header(folder / "pytorch_lora_weights.safetensors")
    tensors = load(body)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    nan = client.post(f"/adapters?why=x&base_unet_sha256={sha}", content=save(tensors, metadata=header), headers=auth)
    assert nan.status_code == 400 and "NaN or Inf" in nan.json()["error"], nan.text
    size = int.from_bytes(body[:8], "little")
    odd_header = json.dumps({**json.loads(body[8:8 + size]), "__metadata__": [METADATA_KEY]}).encode()
    odd = len(odd_header).to_bytes(8, "little") + odd_header + body[8 + size:]
    assert client.post(f"/adapters?why=x&base_unet_sha256={sha}", content=odd, headers=auth).status_code == 400
    # LoRA metadata that is a number, not JSON text, and an empty body: 400 saying so (the number was a 500)
    number_header = json.dumps({**json.loads(body[8:8 + size]), "__metadata__": {METADATA_KEY: 5}}).encode()
    number = len(number_header).to_bytes(8, "little") + number_header + body[8 + size:]
    answer = client.post(f"/adapters?why=x&base_unet_sha256={sha}", content=number, headers=auth)
    assert answer.status_code == 400 and "not JSON text" in answer.json()["error"], answer.text
    empty = client.post(f"/adapters?why=x&base_unet_sha256={sha}", content=b"", headers=auth)
    assert empty.status_code == 400 and "the body is empty" in empty.json()["error"]
    assert registry.versions("adapter") == []
    # the JSON routes' bodies are bounded too (413), and deep nesting is a 400, not a 500
    huge = client.post("/rollout/canary", content=b" " * (65 * 1024), headers=auth)
    assert huge.status_code == 413 and "the JSON body" in huge.json()["error"]
    assert client.post("/rollout/canary", content=b"[" * 60_000, headers=auth).status_code == 400
    made = client.post(f"/adapters?why=nightly&base_unet_sha256={sha}", content=body, headers=auth)
    assert made.status_code == 201, made.text
    version = made.json()["version"]
    assert registry.get("adapter", version).config["r"] == 4
    published = registry.get("adapter", version).history[-1]
    assert (published.state, published.who, published.why) == ("candidate", "admin via HTTP", "nightly")
    canary = client.post("/rollout/canary", json={"version": version, "share": 0.2, "why": "try it"}, headers=auth)
    assert canary.status_code == 200 and [a["adapter"] for a in canary.json()["arms"]] == ["base", version]
    assert client.post("/rollout/canary", json={"version": version, "why": "x"}, headers=auth).status_code == 400
    promoted = client.post("/rollout/promote", json={"version": version, "why": "better"}, headers=auth).json()
    assert promoted["arms"] == [{"name": "A", "adapter": version, "share": 1.0}]
    back = client.post("/rollout/rollback", json={"why": "worse after all", "who": "ops"}, headers=auth).json()
    assert back["arms"][0]["adapter"] == "base"
    # Who, why and when of every change, in the adapter's history and the rollouts'.
    history = registry.get("adapter", version).history
    assert [(h.state, h.who, h.why) for h in history] == [
        ("candidate", "admin via HTTP", "nightly"), ("canary", "admin via HTTP", "try it"),
        ("live", "admin via HTTP", "better"), ("retired", "ops", "rolled back to the base model: worse after all")]
    assert all(h.at.tzinfo is not None for h in history) and [h.at for h in history] == sorted(h.at for h in history)
    last = registry.get("rollout", back["id"]).history[-1]
    assert (last.state, last.who, last.why) == ("live", "ops", "worse after all")
    state = client.get("/rollout", headers=auth).json()
    assert state["registry"]["rollout"]["id"] == back["id"]
    again = client.post("/rollout/promote", json={"version": version, "why": "x"}, headers=auth)
    assert again.status_code == 409 and "retired" in again.json()["error"]


# -- reconciliation in-process ---------------------------------------------------------------------------------------

def _one_worker(tmp_path):
    """A worker's adapter machinery in-process: (pipe, base identity, a copy of the base UNet, registry, batcher,
    slots, a follower of the registry's rollout polling every 0.1 s)."""
    from alignloop.models import load_generator
    from alignloop.serving.adapter_slots import AdapterSlots, RolloutFollower
    from alignloop.serving.batching import DiffusionBatcher

    pipe = load_generator(device="cpu")
    registry = Registry(tmp_path / "reg")
    batcher = DiffusionBatcher(pipe, max_batch_images=8, wait_ms=0)
    slots = AdapterSlots(pipe, batcher, max_slots=3, max_rank=16)
    batcher.activate = slots.activate
    follower = RolloutFollower(slots, str(tmp_path / "reg"), (ArmSpec("A", "base", 1.0),), poll_s=0.1)
    return pipe, base_model_identity(pipe), __import__("copy").deepcopy(pipe.unet), registry, batcher, slots, follower


def test_follower_converges_and_keeps_serving_through_a_refused_adapter(tmp_path):
    pipe, identity, base_unet, registry, batcher, slots, follower = _one_worker(tmp_path)
    try:
        assert follower.reconcile() is False and follower.table.rollout_id == "config"
        good = publish(registry, *make_adapter(base_unet, tmp_path / "good", seed=1), identity)
        started = rollout.start_canary(registry, good.version, 0.5, "test", "canary")
        assert follower.reconcile() is True
        assert follower.table.rollout_id == started.id and good.version in slots.resident()
        # A bad canary (made for another base): refused once, the table and the live adapter untouched.
        promoted = rollout.promote(registry, good.version, "test", "promote")
        follower.reconcile()
        bad = publish(registry, *make_adapter(base_unet, tmp_path / "bad", seed=2),
                      {"generator": "x", "unet_sha256": "cd" * 32})
        rollout.start_canary(registry, bad.version, 0.5, "test", "bad canary")
        loads = slots.loads
        for _ in range(3):
            assert follower.reconcile() is False
        assert follower.table.rollout_id == promoted.id and slots.loads == loads
        assert follower.refused() == [bad.version]
        images = batcher.submit(PROMPT, [1], 2, 5.0, adapter=good.version).result(timeout=60).images
        assert images.isfinite().all()
        # Rolled back: the follower converges on the rollout without the bad adapter.
        back = rollout.rollback(registry, "test", "bad")
        assert follower.reconcile() is True and follower.table.rollout_id == back.id
    finally:
        batcher.close()


def test_a_worker_is_settled_only_once_it_has_read_the_registry_rollout(tmp_path):
    """The readiness the service reports waits for the first rollout read (a worker that could not read the
    registry at start served the config's arms and said it was ready); a later outage does not unsettle it."""
    from alignloop.serving.adapter_slots import RolloutFollower

    pipe, identity, base_unet, registry, batcher, slots, _ = _one_worker(tmp_path)
    try:
        answers = iter([OSError("registry unreachable"), None, OSError("registry unreachable")])

        def source():
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            return answer

        follower = RolloutFollower(slots, str(tmp_path / "reg"), (ArmSpec("A", "base", 1.0),), source=source)
        assert follower.reconcile() is False and not follower.settled
        assert follower.reconcile() is False and follower.settled  # no rollout: the config's arms, as it serves
        assert follower.reconcile() is False and follower.settled
    finally:
        batcher.close()


def test_config_arms_naming_an_adapter_load_it_before_routing_to_it(tmp_path):
    """No rollout published, the config's arms name a published adapter: the base serves until the first reconcile
    has loaded it, then the config's arms (it was never loaded, and every request routed to it failed)."""
    from alignloop.serving.adapter_slots import RolloutFollower

    pipe, identity, base_unet, registry, batcher, slots, _ = _one_worker(tmp_path)
    try:
        tuned = publish(registry, *make_adapter(base_unet, tmp_path / "tuned", seed=1), identity)
        arms = (ArmSpec("A", "base", 0.5), ArmSpec("B", tuned.version, 0.5))
        follower = RolloutFollower(slots, str(tmp_path / "reg"), arms, poll_s=0.1)
        assert follower.table.arms == (ArmSpec("A", "base", 1.0),)
        assert follower.reconcile() is True and follower.table.arms == arms and tuned.version in slots.resident()
        images = batcher.submit(PROMPT, [1], 2, 5.0, adapter=tuned.version).result(timeout=60).images
        assert images.isfinite().all()
    finally:
        batcher.close()


def test_a_rollout_that_needs_more_slots_than_are_free_makes_room_and_converges(tmp_path):
    """One slot, canary A replaced by canary B: A and B do not fit together, so the follower first serves A's arm with
    the base model (its slot frees), then loads B and switches (it waited for a free slot forever)."""
    from alignloop.serving.adapter_slots import AdapterSlots, RolloutFollower

    pipe, identity, base_unet, registry, batcher, _, _ = _one_worker(tmp_path)
    slots = AdapterSlots(pipe, batcher, max_slots=1, max_rank=16)
    batcher.activate = slots.activate
    follower = RolloutFollower(slots, str(tmp_path / "reg"), (ArmSpec("A", "base", 1.0),), poll_s=0.1)
    try:
        a = publish(registry, *make_adapter(base_unet, tmp_path / "a", seed=1), identity)
        b = publish(registry, *make_adapter(base_unet, tmp_path / "b", seed=2), identity)
        rollout.start_canary(registry, a.version, 0.5, "test", "a")
        assert follower.reconcile() is True and list(slots.resident()) == [a.version]
        batcher.submit(PROMPT, [1], 2, 5.0, adapter=a.version).result(timeout=60)  # the UNet last set to A
        rollout.rollback(registry, "test", "a is worse")
        target = rollout.start_canary(registry, b.version, 0.5, "test", "b")
        assert follower.reconcile() is True  # the interim table: A's arm on the base model
        assert {arm.adapter for arm in follower.table.arms} == {"base"} and "making-room" in follower.table.rollout_id
        assert follower.reconcile() is True and follower.table.rollout_id == target.id
        assert list(slots.resident()) == [b.version]
        assert batcher.submit(PROMPT, [1], 2, 5.0, adapter=b.version).result(timeout=60).images.isfinite().all()
    finally:
        batcher.close()


def test_the_previous_live_adapter_stays_resident_for_an_instant_rollback(tmp_path):
    """Four promotions through three slots: the oldest is evicted, the previous live one is not, so rolling back
    (twice, even) switches the routing table without loading anything."""
    pipe, identity, base_unet, registry, batcher, slots, follower = _one_worker(tmp_path)
    try:
        versions = [publish(registry, *make_adapter(base_unet, tmp_path / f"a{i}", seed=30 + i), identity).version
                    for i in range(4)]
        for version in versions:
            rollout.promote(registry, version, "test", "next live")
            assert follower.reconcile() is True
        assert set(slots.resident()) == set(versions[1:])  # v1 evicted, the previous live (v3) kept
        loads = slots.loads
        for expected in (versions[2], versions[1]):
            back = rollout.rollback(registry, "test", "worse")
            assert back.arms[0].adapter == expected
            assert follower.reconcile() is True and follower.table.rollout_id == back.id
            assert slots.loads == loads and follower.last_switch["switch_s"] < 0.5
        images = batcher.submit(PROMPT, [1], 2, 5.0, adapter=versions[1]).result(timeout=60).images
        assert close(images, reference_images(tmp_path / "a1", seeds=[1], steps=2))
    finally:
        batcher.close()


# -- through real served services -------------------------------------------------------------------------------------

def _serve(tmp_path_factory, name, **env):
    from service_fixtures import start_server

    from alignloop.feedback import broker

    home = tmp_path_factory.mktemp(name)
    process, url, log_path = start_server(home, f"127.0.0.1:{broker.free_port()}", f"{name}.", {
        "ALIGNLOOP_ADMIN_TOKEN": ADMIN_TOKEN, "ALIGNLOOP_SERVE_ROLLOUT_POLL_S": "0.5", **env})
    return home, process, url, log_path


def _admin_get(url, path="/admin/rollout"):
    return requests.get(url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)


@pytest.fixture(scope="module")
def base_unet():
    from alignloop.models import load_generator

    return load_generator(device="cpu").unet


def test_two_workers_converge_within_2_s(tmp_path_factory, base_unet):
    from service_fixtures import stop_server

    home, process, url, log_path = _serve(tmp_path_factory, "two-workers", ALIGNLOOP_SERVE_WORKERS="2")
    try:
        registry = Registry(home / "registry")
        tmp = tmp_path_factory.mktemp("two-workers-adapters")
        manifest = publish(registry, *make_adapter(base_unet, tmp / "a", seed=1),
                           base_model_identity("shapes-sd-tiny"))
        changed_at = time.time()
        new = rollout.start_canary(registry, manifest.version, 0.5, "test", "two workers")
        switched, seen = {}, set()
        deadline = time.monotonic() + 30
        while len(switched) < 2 and time.monotonic() < deadline:
            worker = _admin_get(url).json()["worker"]
            seen.add(worker["pid"])
            if worker.get("rollout_id") == new.id:
                switched[worker["pid"]] = worker["last_switch"]["at"] - changed_at
        assert len(switched) == 2, f"workers answering: {seen}, switched: {switched}\n{log_path.read_text()[-3000:]}"
        assert max(switched.values()) <= 2.0, switched
        # A request routed to B is drawn by the canary and says so.
        body = {"prompt": PROMPT, "n": 2, "k": 1, "steps": 2, "seed": 3}
        adapters = {requests.post(url + "/generate", json={**body, "user_id": f"u{i}"}, timeout=120).json()["adapter"]
                    for i in range(12)}
        assert adapters == {"base", manifest.version}
        assert _admin_get(url).status_code == 200
        assert requests.get(url + "/admin/rollout", timeout=30).status_code == 401
        metrics = requests.get(url + "/metrics", timeout=30).text
        assert f'alignloop_serving_images_total{{adapter="{manifest.version}"}}' in metrics
    finally:
        stop_server(process)


def _wait_for_rollout(url, rollout_id, log_path, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _admin_get(url).json()["worker"].get("rollout_id") == rollout_id:
            return
        time.sleep(0.2)
    raise AssertionError(f"the worker never served rollout {rollout_id}:\n{log_path.read_text()[-3000:]}")


def _spooled_events(home):
    """The events the worker's producer spooled (its broker is unreachable in `_serve`), as dicts."""
    events = []
    for segment in sorted((home / "spool").glob("serving-worker-*/*.seg")):
        for line in segment.read_bytes().splitlines():
            _crc, _topic, _key, value = line.split(b"\t", 3)
            events.append(json.loads(value))
    return events


def test_anonymous_browser_users_are_sticky_by_the_ui_cookie(tmp_path_factory, base_unet):
    """Through a real server: GET /ui sets the signed cookie, /generate without a user id routes by it (sticky), fresh
    browsers land in both arms of a 50/50 canary, a tampered cookie is ignored (a random arm, a fresh cookie from
    /ui, never a 500), and events of cookie users carry no user hash and the anonymous id appears nowhere."""
    from service_fixtures import stop_server

    from alignloop.serving.arms import ANON_COOKIE

    home, process, url, log_path = _serve(tmp_path_factory, "anon-cookie")
    body = {"prompt": PROMPT, "n": 2, "k": 1, "steps": 1, "seed": 5}

    answers = {}  # request id -> (arm, adapter) as the response named them

    def generate(session, headers=None):
        response = session.post(url + "/generate", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        answer = response.json()
        answers[answer["request_id"]] = (answer["arm"], answer["adapter"])
        last[(answer["arm"], answer["adapter"])] = (answer, session)
        return answer["arm"], answer["adapter"]

    last = {}  # (arm, adapter) -> the last response from it, and the browser (session) it went to

    try:
        registry = Registry(home / "registry")
        tmp = tmp_path_factory.mktemp("anon-cookie-adapters")
        manifest = publish(registry, *make_adapter(base_unet, tmp / "b", seed=7), base_model_identity("shapes-sd-tiny"))
        canary = rollout.start_canary(registry, manifest.version, 0.5, "test", "anonymous users")
        _wait_for_rollout(url, canary.id, log_path)
        arms = {("A", "base"), ("B", manifest.version)}

        # 1. /ui sets the cookie: signed, HttpOnly, SameSite=Lax, for the whole site, no Secure over plain HTTP.
        browser = requests.Session()
        page = browser.get(url + "/ui", timeout=30)
        assert page.status_code == 200
        set_cookie = page.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
        assert set_cookie.startswith(f"{ANON_COOKIE}=") and {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "samesite=lax" in set_cookie.lower() and "secure" not in attributes
        cookie = browser.cookies[ANON_COOKIE]
        anon_id = cookie.split(".")[0]
        # A valid cookie is kept: the page does not mint another.
        assert "set-cookie" not in browser.get(url + "/ui", timeout=30).headers

        # 2. Sticky: six requests without a user id land on one arm and its adapter.
        mine = {generate(browser) for _ in range(6)}
        assert len(mine) == 1 and mine <= arms, mine

        # 3. Fresh browsers are spread over both arms (12 of them all on one arm: p = 2 * 0.5**12).
        seen = set()
        for _ in range(12):
            fresh = requests.Session()
            assert fresh.get(url + "/ui", timeout=30).status_code == 200 and ANON_COOKIE in fresh.cookies
            seen.add(generate(fresh))
            if seen == arms:
                break
        assert seen == arms, seen
        # A vote on each arm's image is counted under the arm and the adapter version that drew it. The token is
        # bound to the browser's cookie: from that browser it counts, without the cookie it is refused.
        for arm, adapter in arms:
            answer, session = last[(arm, adapter)]
            vote = {"feedback_token": answer["images"][0]["feedback_token"], "vote": "up"}
            assert requests.post(url + "/feedback", json=vote, timeout=60).status_code == 403
            assert session.post(url + "/feedback", json=vote, timeout=60).status_code == 202
        from prometheus_client.parser import text_string_to_metric_families

        counted = {(sample.labels["arm"], sample.labels["adapter"]): sample.value
                   for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=30).text)
                   for sample in family.samples if sample.name == "alignloop_serving_votes_total"
                   and sample.labels.get("vote") == "up" and sample.labels.get("outcome") == "accepted"}
        assert counted == {arm: 1.0 for arm in arms}, counted

        # 4. A tampered cookie is not trusted: routed at random (the other arm within a few requests), /ui replaces
        #    it, and no odd value makes a 500.
        (my_arm,) = mine
        other = (arms - mine).pop()
        id_, signature = cookie.split(".")
        tampered = {"Cookie": f"{ANON_COOKIE}={id_}.{'0' if signature[0] != '0' else '1'}{signature[1:]}"}
        landed = set()
        for _ in range(16):
            landed.add(generate(requests, headers=tampered))
            if other in landed:
                break
        assert other in landed, f"a tampered cookie still routed to {my_arm} 16 times in a row"
        page = requests.get(url + "/ui", headers=tampered, timeout=30)
        assert page.status_code == 200 and page.cookies[ANON_COOKIE].split(".")[0] != id_  # a new id, freshly signed
        for odd in ("x" * 5000, f"{id_}.{signature}.{signature}", f"{id_}.{signature[:-1]}\u00e9",
                    f'"{id_}.{signature[:-1]}\\303\\251"'):  # non-ASCII once decoded; the last in cookie quoting
            headers = {"Cookie": f"{ANON_COOKIE}={odd}".encode("utf-8")}
            assert requests.get(url + "/ui", headers=headers, timeout=30).status_code == 200, odd
            odd_generate = requests.post(url + "/generate", json=body, headers=headers, timeout=120)
            assert odd_generate.status_code == 200, (odd, odd_generate.text)
    finally:
        stop_server(process)

    # 5. No raw id anywhere: anonymous generation events carry no user hash, and the cookie's id is in no event and
    #    no log line (the producer spools on shutdown: its broker in `_serve` is unreachable).
    events = _spooled_events(home)
    generations = [e for e in events if e["schema"].startswith("alignloop.generation/")]
    votes = [e for e in events if e["schema"].startswith("alignloop.feedback/")]
    assert len(generations) >= 6 + 2 + 2 and len(votes) == 2, f"{len(events)} events spooled"
    assert all(e["user_hash"] is None for e in generations + votes)
    # Each event names the arm and adapter version its response named.
    assert all(answers[e["request_id"]] == (e["arm"], e["adapter_version"]) for e in generations + votes
               if e["request_id"] in answers)
    assert {(e["arm"], e["adapter_version"]) for e in votes} == arms
    assert anon_id not in json.dumps(events) and anon_id not in log_path.read_text()


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def _as_png_array(image) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(dtype=__import__("torch").uint8).permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.slow
def test_swap_under_load_every_image_matches_the_adapter_it_names(tmp_path_factory, base_unet):
    """8 clients for 60 s while the live adapter is swapped 10 times: no failed request, and every image equals
    what the adapter its response names draws alone (so no request saw mixed weights)."""
    from service_fixtures import stop_server

    from alignloop.serving.sampler import candidate_seeds

    duration_s, swaps, clients = float(os.environ.get("ALIGNLOOP_TEST_SWAP_S", 60)), 10, 8
    home, process, url, log_path = _serve(tmp_path_factory, "swap-load")
    try:
        registry = Registry(home / "registry")
        tmp = tmp_path_factory.mktemp("swap-adapters")
        identity = base_model_identity("shapes-sd-tiny")
        folders, versions = {}, []
        for i in range(swaps + 1):
            folder, config = make_adapter(base_unet, tmp / f"a{i}", seed=100 + i)
            versions.append(publish(registry, folder, config, identity).version)
            folders[versions[-1]] = folder
        rollout.promote(registry, versions[0], "test", "first live")

        # References: each adapter alone, for every (request seed, candidate) the clients can get back.
        request_seeds, n, steps = [7, 8], 2, 3
        seeds = sorted({s for rs in request_seeds for s in candidate_seeds(rs, n)})
        references = {}
        for version, folder in folders.items():
            images = reference_images(folder, seeds=seeds, steps=steps)
            references[version] = {s: _as_png_array(im) for s, im in zip(seeds, images)}

        results, failures, stop = [], [], threading.Event()

        def client(c):
            i = 0
            while not stop.is_set():
                body = {"prompt": PROMPT, "n": n, "k": n, "steps": steps, "guidance": 5.0,
                        "seed": request_seeds[(c + i) % 2], "user_id": f"client-{c}"}
                i += 1
                try:
                    response = requests.post(url + "/generate", json=body, timeout=120)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        results.append(response.json())
                except requests.RequestException as err:
                    failures.append(repr(err))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        started = time.monotonic()
        for version in versions[1:]:
            time.sleep(duration_s / (swaps + 1))
            rollout.promote(registry, version, "test", "swap under load")
        time.sleep(max(0.0, duration_s - (time.monotonic() - started)))
        stop.set()
        for t in threads:
            t.join()

        assert not failures, failures[:5]
        served = {r["adapter"] for r in results}
        assert len(served) >= swaps, f"only {sorted(served)} served; the swaps did not land\n{log_path.read_text()[-2000:]}"
        mismatched = []
        for r in results:
            for im in r["images"]:
                got = _png(im["image"])
                own = int(np.abs(got - references[r["adapter"]][im["seed"]]).max())
                if own > 1:
                    mismatched.append((r["request_id"], r["adapter"], im["seed"], own))
        assert not mismatched, mismatched[:5]
        # The references tell adapters apart: the check above would catch an image drawn by another one.
        a, b = versions[0], versions[1]
        assert np.abs(references[a][seeds[0]] - references[b][seeds[0]]).max() > 10
    finally:
        stop_server(process)


# -- per-arm batching (fakes) ---------------------------------------------------------------------------------------

def test_passes_are_split_by_adapter_and_weight_changes_run_between_passes():
    from test_serving_units import FakePipeline

    from alignloop.serving.batching import DiffusionBatcher
    from alignloop.serving.sampler import candidate_seeds

    events, active = [], [None]

    class Recording(FakePipeline):  # a pipeline object: alignloop.generation.generate configures its progress bar
        def __call__(self, **kw):
            events.append(("pass", active[0], len(kw["prompt"])))
            return super().__call__(**kw)

    batcher = DiffusionBatcher(Recording(delay_s=0.02), max_batch_images=16, wait_ms=20,
                               activate=lambda adapter: active.__setitem__(0, adapter))
    try:
        futures = [batcher.submit(f"p{i}", candidate_seeds(i, 3), 4, 7.5, adapter=a)
                   for i, a in enumerate(["base", "v000001", "base", "v000001"])]
        swapped = batcher.call(lambda: events.append(("swap", active[0], 0)) or "done")
        [f.result(timeout=10) for f in futures]
        assert swapped.result(timeout=10) == "done"
    finally:
        batcher.close()
    passes = [e for e in events if e[0] == "pass"]
    assert sorted((a, size) for _, a, size in passes) == [("base", 6), ("v000001", 6)]  # one pass per adapter
    assert [e[0] for e in events].count("swap") == 1  # ran once, on the batcher thread, between two passes
