"""Identity, rate limits and the queue bound through a real server configured as behind an authenticating proxy:
the proxy's header is the identity (the body's user_id ignored, no header: 401), a token voted by another
identity gets 403 and counts nowhere, a burst over the rate limit gets 429 with Retry-After, a full queue 503
with Retry-After. The session server (tests/service_fixtures.py) covers the mode without a proxy."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
from kafka_fixtures import read_topic

from alignloop.events import hash_user_id, parse_event
from alignloop.feedback.config import Topics

pytestmark = pytest.mark.kafka

HEADER = "X-Alignloop-User"
PROMPT = "two blue squares on a white background"
CHEAP = {"prompt": PROMPT, "n": 1, "k": 1, "steps": 1}


@pytest.fixture(scope="module")
def proxied(kafka_broker, tmp_path_factory):
    from service_fixtures import start_server, stop_server

    home = tmp_path_factory.mktemp("serving-proxied")
    prefix = f"abuse-{uuid.uuid4().hex[:8]}."
    topics = kafka_broker.create_topics(Topics().prefixed(prefix))
    user_hash_key = uuid.uuid4().hex
    process, url, log_path = start_server(home, kafka_broker.bootstrap, prefix, {
        "ALIGNLOOP_USER_HASH_KEY": user_hash_key,
        "ALIGNLOOP_SERVE_IDENTITY_HEADER": HEADER,
        "ALIGNLOOP_SERVE_GENERATE_PER_MIN": "6", "ALIGNLOOP_SERVE_GENERATE_BURST": "3",
        "ALIGNLOOP_SERVE_FEEDBACK_PER_MIN": "6", "ALIGNLOOP_SERVE_FEEDBACK_BURST": "7",
        "ALIGNLOOP_SERVE_MAX_QUEUED_IMAGES": "4",
    })
    try:
        yield SimpleNamespace(url=url, topics=topics, bootstrap=kafka_broker.bootstrap, log_path=log_path,
                              user_hash_key=user_hash_key.encode())
    finally:
        stop_server(process)


def _post(server, path, body, user=None, **kwargs):
    headers = {HEADER: user} if user else {}
    return requests.post(server.url + path, json=body, headers=headers, timeout=300, **kwargs)


def _feedback_events(server, image_id, count, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while True:
        events = [e for e in (parse_event(r.value) for r in read_topic(server.bootstrap, server.topics.feedback))
                  if e.image_id == image_id]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_the_proxy_header_is_the_identity(proxied):
    # 1. No header: the request did not come through the proxy.
    for path, body in (("/generate", CHEAP), ("/feedback", {"feedback_token": "v2.x.y.z", "vote": "up"})):
        response = _post(proxied, path, body)
        assert response.status_code == 401 and response.json()["reason"] == "unauthenticated", response.text
        assert HEADER in response.json()["error"]
    # 2. The body's user_id is ignored: the image is alice's, whatever the body says.
    result = _post(proxied, "/generate", {**CHEAP, "user_id": "mallory"}, user="alice").json()
    token, image_id = result["images"][0]["feedback_token"], result["images"][0]["image_id"]
    refused = _post(proxied, "/feedback", {"feedback_token": token, "vote": "up", "user_id": "alice"}, user="mallory")
    assert refused.status_code == 403 and refused.json()["reason"] == "other_identity", refused.text
    accepted = _post(proxied, "/feedback", {"feedback_token": token, "vote": "up", "user_id": "mallory"}, user="alice")
    assert accepted.status_code == 202, accepted.text
    [event] = _feedback_events(proxied, image_id, 1)
    assert event.user_hash == hash_user_id("alice", proxied.user_hash_key)


def test_one_token_voted_under_many_identities_counts_once(proxied):
    result = _post(proxied, "/generate", CHEAP, user="owner-1").json()
    token, image_id = result["images"][0]["feedback_token"], result["images"][0]["image_id"]
    answers = [_post(proxied, "/feedback", {"feedback_token": token, "vote": "down"}, user=f"sock-puppet-{i}")
               for i in range(6)]
    assert [a.status_code for a in answers] == [403] * 6
    assert _post(proxied, "/feedback", {"feedback_token": token, "vote": "down"}, user="owner-1").status_code == 202
    events = _feedback_events(proxied, image_id, 1)
    time.sleep(1)  # anything counted twice would have arrived by now
    assert len(_feedback_events(proxied, image_id, 1)) == len(events) == 1
    assert events[0].user_hash == hash_user_id("owner-1", proxied.user_hash_key)


def test_over_the_rate_limit_gets_429_with_retry_after(proxied):
    answers = [_post(proxied, "/generate", CHEAP, user="eager") for _ in range(4)]  # the burst is 3
    assert [a.status_code for a in answers] == [200, 200, 200, 429], [a.text for a in answers]
    limited = answers[-1]
    assert limited.json()["reason"] == "rate_limited" and "retry in" in limited.json()["error"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 10  # one request per 10 s at 6 a minute
    assert _post(proxied, "/generate", CHEAP, user="patient").status_code == 200  # per identity
    votes = [_post(proxied, "/feedback", {"feedback_token": "v2.x.y.z", "vote": "up"}, user="eager")
             for _ in range(8)]  # /feedback has its own bucket: 7, then 429
    assert [v.status_code for v in votes] == [401] * 7 + [429]
    assert int(votes[-1].headers["Retry-After"]) >= 1


def test_a_full_queue_gets_503_with_retry_after(proxied):
    body = {"prompt": PROMPT, "n": 4, "k": 1, "steps": 40}  # the queue holds 4 images: one such request
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: _post(proxied, "/generate", body, user=f"crowd-{i}"), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 1, [a.text for a in answers]
    for answer in answers:
        if answer.status_code == 503:
            assert answer.json()["reason"] == "queue_full" and "at capacity" in answer.json()["error"]
            assert int(answer.headers["Retry-After"]) >= 1
    assert _post(proxied, "/generate", CHEAP, user="crowd-after").status_code == 200  # drained: served again
    assert "Traceback" not in proxied.log_path.read_text(errors="replace")
