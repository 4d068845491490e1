"""Through the real server (`alignloop serve`, fixture `served`) with a real HTTP client and a real broker."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from kafka_fixtures import read_topic
from PIL import Image

from alignloop.events import hash_user_id, parse_event
from alignloop.serving import tokens

pytestmark = pytest.mark.kafka

PROMPT = "three red circles on a gray background"
USER = "alice-serving-test-7f3a"  # must never appear raw in Kafka or in the server log


def _user_hash(served, user_id: str) -> str:
    return hash_user_id(user_id, served.user_hash_key)


def _events(served, topic: str, **match):
    events = [parse_event(r.value) for r in read_topic(served.bootstrap, topic)]
    return [e for e in events if all(getattr(e, k) == v for k, v in match.items())]


def _wait_events(served, topic: str, count: int, timeout_s: float = 30, **match):
    deadline = time.monotonic() + timeout_s
    while True:
        found = _events(served, topic, **match)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="module")
def generation(served):
    """One seeded generation shared by the tests of this module (sampling is the slow part)."""
    body = {"prompt": f"  {PROMPT}  ", "n": 6, "k": 3, "steps": 3, "seed": 1234, "user_id": USER}
    response = served.post("/generate", body)
    assert response.status_code == 200, response.text
    return body, response.json()


# -- /generate ------------------------------------------------------------------------------------------------

def test_generate_returns_k_images_ranked_by_reward(generation, served):
    body, result = generation
    images = result["images"]
    assert len(images) == body["k"]
    assert [im["rank"] for im in images] == [1, 2, 3]
    rewards = [im["reward"] for im in images]
    assert rewards == sorted(rewards, reverse=True)
    assert (result["arm"], result["adapter"], result["seed"], result["n"], result["steps"]) == ("A", "base", 1234, 6, 3)
    for im in images:
        png = base64.b64decode(im["image"])
        assert Image.open(io.BytesIO(png)).size == (32, 32)
        claims = tokens.verify(served.token_key, im["feedback_token"])
        assert (claims.image_id, claims.request_id, claims.arm) == (im["image_id"], result["request_id"], "A")
        assert claims.prompt_sha == tokens.prompt_hash(PROMPT)  # the prompt was trimmed
    t = result["timings"]
    assert set(t) == {"queue_ms", "sampling_ms", "scoring_ms", "storing_ms", "producing_ms", "total_ms"}
    assert t["total_ms"] >= t["sampling_ms"] > 0


def test_generate_is_reproducible_with_a_seed(generation, served):
    body, first = generation
    again = served.post("/generate", body).json()
    assert [im["image"] for im in again["images"]] == [im["image"] for im in first["images"]]
    assert [im["reward"] for im in again["images"]] == [im["reward"] for im in first["images"]]
    assert again["request_id"] != first["request_id"]
    other = served.post("/generate", {**body, "seed": 1235}).json()
    assert [im["image"] for im in other["images"]] != [im["image"] for im in first["images"]]


def test_generation_event_lands_on_kafka_without_the_raw_user_id(generation, served):
    body, result = generation
    [event] = _wait_events(served, served.topics.generations, 1, request_id=result["request_id"])
    assert event.prompt == PROMPT
    assert (event.params.n, event.params.k, event.params.steps, event.params.seed) == (6, 3, 3, 1234)
    assert [im.image_id for im in event.images] == [im["image_id"] for im in result["images"]]
    assert [im.reward for im in event.images] == [im["reward"] for im in result["images"]]
    assert len(event.candidate_rewards) == 6 and max(event.candidate_rewards) == result["images"][0]["reward"]
    assert event.user_hash == _user_hash(served, USER)
    for im in event.images:  # the image store holds what was returned
        path = im.uri.removeprefix("file://")
        assert open(path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = b"".join(r.value for r in read_topic(served.bootstrap, served.topics.generations))
    assert USER.encode() not in raw


# -- /feedback ------------------------------------------------------------------------------------------------

def test_feedback_round_trip_lands_on_kafka(generation, served):
    _, result = generation
    image = result["images"][0]
    response = served.post("/feedback", {"feedback_token": image["feedback_token"], "vote": "up", "user_id": USER})
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["status"] == "accepted" and answer["image_id"] == image["image_id"]
    [event] = _wait_events(served, served.topics.feedback, 1, image_id=image["image_id"])
    assert str(event.event_id) == answer["event_id"]
    assert (event.vote, event.request_id, event.arm, event.adapter_version) == ("up", result["request_id"], "A", "base")
    assert event.user_hash == _user_hash(served, USER)
    assert event.image_uri.endswith(image["image_id"] + ".png")


def test_replayed_vote_is_idempotent_and_a_changed_vote_is_new(generation, served):
    _, result = generation
    image = result["images"][1]
    vote = {"feedback_token": image["feedback_token"], "vote": "down", "user_id": USER}
    first = served.post("/feedback", vote)
    replays = [served.post("/feedback", vote) for _ in range(3)]
    assert first.status_code == 202 and first.json()["status"] == "accepted"
    for replay in replays:
        assert replay.status_code == 202
        assert replay.json() == {**first.json(), "status": "duplicate"}
    other_user = served.post("/feedback", {**vote, "user_id": "bob-serving-test"})
    assert other_user.status_code == 403 and other_user.json()["reason"] == "other_identity"  # not his image
    changed = served.post("/feedback", {**vote, "vote": "up"})
    assert changed.json()["status"] == "accepted" and changed.json()["event_id"] != first.json()["event_id"]
    events = _wait_events(served, served.topics.feedback, 2, image_id=image["image_id"])
    time.sleep(1)  # anything double-counted would have arrived by now
    events = _events(served, served.topics.feedback, image_id=image["image_id"])
    assert sorted((e.vote, e.user_hash == _user_hash(served, USER)) for e in events) == [("down", True), ("up", True)]


def test_one_token_voted_under_many_identities_counts_once(served):
    """The ballot stuffing of issue 14: one token sent as a thumbs-down under six made-up user ids (and with no id
    at all) gave six 202s and six events. Now the token is bound to who generated the image: one event."""
    result = served.post("/generate", {"prompt": PROMPT, "n": 1, "k": 1, "steps": 1, "user_id": "stuffer-0"}).json()
    token = result["images"][0]["feedback_token"]
    answers = [served.post("/feedback", {"feedback_token": token, "vote": "down", "user_id": f"stuffer-{i}"})
               for i in range(6)]
    answers.append(served.post("/feedback", {"feedback_token": token, "vote": "down"}))
    assert [a.status_code for a in answers] == [202] + [403] * 6, [a.text for a in answers]
    assert all(a.json()["reason"] == "other_identity" and "another identity" in a.json()["error"] for a in answers[1:])
    _wait_events(served, served.topics.feedback, 1, image_id=result["images"][0]["image_id"])
    time.sleep(1)
    assert len(_events(served, served.topics.feedback, image_id=result["images"][0]["image_id"])) == 1


def _tamper(token: str, **changes) -> str:
    version, kid, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{version}.{kid}.{forged_payload}.{signature}"


def _with_key_id_of(token: str, key: bytes) -> str:
    version, _, payload, signature = token.split(".")
    return f"{version}.{tokens.key_id(key)}.{payload}.{signature}"


@pytest.mark.parametrize("case, reason", [
    ("forged", "unknown_key"), ("forged under our key id", "bad_signature"), ("tampered", "bad_signature"),
    ("another owner written in", "bad_signature"), ("expired", "expired"), ("retired key", "unknown_key"),
    ("truncated", "malformed"), ("garbage", "malformed"),
])
def test_bad_tokens_are_rejected_with_401_and_a_reason(generation, served, case, reason):
    _, result = generation
    image = result["images"][2]
    claims = tokens.verify(served.token_key, image["feedback_token"])
    token = {
        "forged": tokens.mint(b"not-the-server-key", claims),
        "forged under our key id": _with_key_id_of(tokens.mint(b"not-the-server-key", claims), served.token_key),
        "tampered": _tamper(image["feedback_token"], arm="B"),  # e.g. crediting another arm
        "another owner written in": _tamper(image["feedback_token"], owner="0" * 32),
        "expired": tokens.mint(served.token_key, tokens.TokenClaims(**{**claims.__dict__, "expires_at": int(time.time()) - 5})),
        "retired key": tokens.mint(b"a-key-retired-before-the-previous-one", claims),
        "truncated": image["feedback_token"][:-10],
        "garbage": "hello",
    }[case]
    response = served.post("/feedback", {"feedback_token": token, "vote": "up", "user_id": USER})
    assert response.status_code == 401, response.text
    assert response.json()["reason"] == reason
    assert "feedback_token" in response.json()["error"]
    assert not _events(served, served.topics.feedback, image_id=image["image_id"])


def test_tokens_of_the_previous_key_are_accepted_during_a_rotation(generation, served):
    """The server holds a previous key (service_fixtures): a token it signed, before the rotation, still counts."""
    _, result = generation
    image = result["images"][2]
    claims = tokens.verify(served.token_key, image["feedback_token"])
    assert image["feedback_token"].split(".")[1] == tokens.key_id(served.token_key)  # new tokens: the current key
    old = tokens.mint(served.previous_token_key, claims)
    response = served.post("/feedback", {"feedback_token": old, "vote": "up", "user_id": USER})
    assert response.status_code == 202 and response.json()["status"] == "accepted", response.text
    [event] = _wait_events(served, served.topics.feedback, 1, image_id=image["image_id"])
    assert str(event.event_id) == response.json()["event_id"]


# -- bad input: 4xx naming the field, never a 500 ---------------------------------------------------------------

BAD_GENERATE = [
    ("empty prompt", {"prompt": ""}, "prompt", "at least 1 character"),
    ("blank prompt", {"prompt": "   \t "}, "prompt", "at least 1 character"),
    ("a separator that str.strip() trims", {"prompt": "\x1f"}, "prompt", "control characters"),
    ("a newline inside", {"prompt": "a red\ncircle"}, "prompt", "control characters"),
    ("10,000-char prompt", {"prompt": "x" * 10_000}, "prompt", "at most 500 characters"),
    ("k > n", {"prompt": PROMPT, "n": 3, "k": 5}, "k", "at most n"),
    ("n below the default k", {"prompt": PROMPT, "n": 1}, "k", "got k=2, n=1"),
    ("n = 0", {"prompt": PROMPT, "n": 0, "k": 1}, "n", "greater than or equal to 1"),
    ("n = 1000", {"prompt": PROMPT, "n": 1000}, "n", "less than or equal to 64"),
    ("steps = 0", {"prompt": PROMPT, "steps": 0}, "steps", "greater than or equal to 1"),
    ("steps = 151", {"prompt": PROMPT, "steps": 151}, "steps", "less than or equal to 150"),
    ("guidance = 31", {"prompt": PROMPT, "guidance": 31}, "guidance", "less than or equal to 30"),
    ("negative seed", {"prompt": PROMPT, "seed": -1}, "seed", "greater than or equal to 0"),
    ("n as a string", {"prompt": PROMPT, "n": "8"}, "n", "valid integer"),
    ("n as a float", {"prompt": PROMPT, "n": 8.5}, "n", "valid integer"),
    ("prompt as a number", {"prompt": 42}, "prompt", "valid string"),
    ("unknown field", {"prompt": PROMPT, "stepz": 20}, "stepz", "Extra inputs are not permitted"),
    ("missing prompt", {"n": 4}, "prompt", "Field required"),
    ("long user id", {"prompt": PROMPT, "user_id": "u" * 200}, "user_id", "at most 128 characters"),
    ("user id with spaces", {"prompt": PROMPT, "user_id": "a b"}, "user_id", "should match pattern"),
    ("a list", [PROMPT], "body", "object"),
]


@pytest.mark.parametrize("case, body, field, message", BAD_GENERATE, ids=[c[0] for c in BAD_GENERATE])
def test_bad_generate_input_gets_400_naming_the_field(served, case, body, field, message):
    response = served.post("/generate", body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"].startswith(f"{field}: ") and message in error["error"], error
    assert error["fields"][0]["field"] == field


@pytest.mark.parametrize("path", ["/generate", "/feedback"])
def test_invalid_json_gets_400(served, path):
    response = served.post(path, data=b'{"prompt": "three', timeout=30, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "Invalid JSON" in response.json()["error"]


BAD_FEEDBACK = [
    ("missing token", {"vote": "up"}, "feedback_token", "Field required"),
    ("empty token", {"feedback_token": "", "vote": "up"}, "feedback_token", "at least 1 character"),
    ("huge token", {"feedback_token": "v1." + "a" * 5000, "vote": "up"}, "feedback_token", "at most 2048"),
    ("bad vote", {"feedback_token": "v1.a.b", "vote": "sideways"}, "vote", "'up' or 'down'"),
    ("vote as bool", {"feedback_token": "v1.a.b", "vote": True}, "vote", "'up' or 'down'"),
    ("unknown field", {"feedback_token": "v1.a.b", "vote": "up", "score": 5}, "score", "Extra inputs"),
]


@pytest.mark.parametrize("case, body, field, message", BAD_FEEDBACK, ids=[c[0] for c in BAD_FEEDBACK])
def test_bad_feedback_input_gets_400_naming_the_field(served, case, body, field, message):
    response = served.post("/feedback", body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}: ") and message in response.json()["error"]


@pytest.mark.parametrize("content_type, data", [
    ("application/x-www-form-urlencoded", b"prompt=a&n=2"),
    ("multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n'
                                          b'--xyz\r\nContent-Disposition: form-data; name="n"\r\n\r\n0\r\n--xyz--\r\n'),
    ("application/vnd.bentoml+pickle", b"\x80\x04K\x01."),
    ("text/plain", b"three red circles"),
], ids=["form", "multipart", "pickle", "text"])
def test_other_content_types_get_415(served, content_type, data):
    response = served.post("/generate", data=data, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code == 415, response.text
    assert "Content-Type must be application/json" in response.json()["error"]


def test_oversized_body_gets_413(served):
    response = served.post("/generate", {"prompt": "x" * 100_000}, timeout=30)
    assert response.status_code == 413 and "at most" in response.json()["error"]


def test_wrong_method_and_unknown_route_are_4xx(served):
    assert served.get("/generate").status_code == 405
    assert served.get("/nope").status_code == 404


# -- operations ---------------------------------------------------------------------------------------------

def test_probes_openapi_and_ui(served):
    assert served.get("/livez").status_code == 200
    assert served.get("/readyz").status_code == 200
    spec = served.get("/docs.json").json()
    assert "/generate" in spec["paths"] and "/feedback" in spec["paths"]
    text = json.dumps(spec)
    assert '"maximum": 64' in text and '"maxLength": 500' in text and "three red circles" in text
    # The API's own answers are documented (serving/openapi.py), not BentoML's defaults.
    assert set(spec["paths"]["/generate"]["post"]["responses"]) == {"200", "400", "401", "413", "415", "429", "500", "503"}
    assert set(spec["paths"]["/feedback"]["post"]["responses"]) == {"202", "400", "401", "403", "413", "415", "429", "503"}
    assert "Retry-After" in spec["paths"]["/generate"]["post"]["responses"]["503"]["headers"]
    page = served.get("/ui/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # no external asset
    assert served.get("/ui/ui.js").status_code == 200


def test_concurrent_requests_share_forward_passes(served):
    def metric(text, name):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    before = served.get("/metrics").text
    body = {"prompt": PROMPT, "n": 4, "k": 1, "steps": 2}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: served.post("/generate", {**body, "seed": i}), range(4)))
    assert all(r.status_code == 200 for r in responses)
    after = served.get("/metrics").text
    passes = metric(after, "alignloop_serving_pass_requests_count") - metric(before, "alignloop_serving_pass_requests_count")
    requests_in_passes = metric(after, "alignloop_serving_pass_requests_sum") - metric(before, "alignloop_serving_pass_requests_sum")
    assert requests_in_passes == 4
    assert passes < 4, f"4 concurrent requests took {passes} passes: no sharing"


def test_metrics_and_logs(generation, served):
    served.post("/feedback", {"feedback_token": "v1.x.y", "vote": "up"})
    text = served.get("/metrics").text
    for name in ('alignloop_serving_stage_seconds_bucket{le="0.001",stage="sampling"}', "alignloop_serving_request_n_count",
                 'alignloop_serving_reward_count{arm="A",kind="chosen"}', 'alignloop_serving_votes_total{adapter="base",arm="A"',
                 'alignloop_serving_feedback_rejected_total{reason="malformed"}', "alignloop_serving_pass_images_count"):
        assert name in text, name
    log = served.log_text()
    assert generation[1]["request_id"] in log  # structured lines carry request ids
    assert USER not in log and "Traceback" not in log


def test_starting_another_server_leaves_this_ones_metrics_alone(served, tmp_path, kafka_broker):
    """BentoML empties its Prometheus multiprocess folder at every start; with one shared ~/bentoml a second server
    wiped the first's metric files and its /metrics lost every count. Each server has its own folder now."""
    import psutil
    from service_fixtures import start_server, stop_server

    def pass_images(url_text):
        return sum(float(line.split()[-1]) for line in url_text.splitlines()
                   if line.startswith("alignloop_serving_pass_images_count"))

    assert served.post("/generate", {"prompt": PROMPT, "n": 2, "k": 1, "steps": 2}).status_code == 200
    before = pass_images(served.get("/metrics").text)
    assert before >= 1
    workers = psutil.Process(served.process.pid).children(recursive=True)
    assert all(w.environ().get("PROMETHEUS_MULTIPROC_DIR", "").startswith(str(served.home)) for w in workers), \
        [w.environ().get("PROMETHEUS_MULTIPROC_DIR") for w in workers]
    process, _, _ = start_server(tmp_path / "second", kafka_broker.bootstrap, "second.")
    try:
        assert pass_images(served.get("/metrics").text) >= before
    finally:
        stop_server(process)
