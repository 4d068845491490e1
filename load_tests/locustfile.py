"""Simulated users against a running service (locust). `load_tests/run.py` starts Kafka and the service, picks
the user class and the knobs per scenario, and reads the report this file writes when locust quits.

User classes:
- `MixUser`, the realistic mix: generate with n in N_MIN..N_MAX and k in 1..min(K_MAX, n), look at the images
  (THINK seconds), thumb each with probability CTR through `/feedback` (the vote of `alignloop.world.SimulatedRater`:
  the oracle with noise and a bias), now and then click twice (the repeat must come back `duplicate`); repeat.
- `FeedbackBurstUser`, the feedback path alone: fetch BURST_TOKENS feedback tokens (cheap 2-step generations),
  then vote on them back to back, no think time, and stop.

Each user has its own identity: the IDENTITY_HEADER header (the service trusts it as an authenticating proxy's)
or, without one, the body's `user_id`. A 429 or 503 with Retry-After is counted as shed load ("shed: 503
queue_full") and the user waits as told; one without Retry-After, any other status, a wrong answer or a
connection error is a failure of its own kind. Loopback only, at most MAX_USERS users; always give `-t`.

Knobs (environment, ALIGNLOOP_LOAD_*): N_MIN 4, N_MAX 16, K_MAX 4, STEPS 20, CTR 0.5, THINK "1-4" (seconds, a
range), REPEAT 0.1, BURST_TOKENS 32, IDENTITY_HEADER "", REPORT (the JSON report's path; none if unset).
"""

import base64
import io
import json
import os
import random
import time
from collections import Counter, defaultdict
from urllib.parse import urlparse

import gevent
import numpy as np
from locust import HttpUser, constant, events, task
from locust.exception import StopUser
from PIL import Image

from alignloop.world import SimulatedRater, sample_prompts


def _knob(name, default, kind=str):
    return kind(os.environ.get("ALIGNLOOP_LOAD_" + name, default))


N_MIN, N_MAX, K_MAX = _knob("N_MIN", 4, int), _knob("N_MAX", 16, int), _knob("K_MAX", 4, int)
STEPS = _knob("STEPS", 20, int)
CTR, REPEAT = _knob("CTR", 0.5, float), _knob("REPEAT", 0.1, float)
THINK = tuple(float(x) for x in _knob("THINK", "1-4").split("-"))
BURST_TOKENS = _knob("BURST_TOKENS", 32, int)
IDENTITY_HEADER = _knob("IDENTITY_HEADER", "")
REPORT = _knob("REPORT", "")
MAX_USERS = 64
MAX_RETRY_WAIT_S = 30.0

# What the report counts beside locust's own statistics (one locust process: plain module state is enough).
_latencies_ms = defaultdict(list)  # endpoint -> response times of the requests that succeeded
_kinds = Counter()  # (endpoint, kind) -> count, for every request that did not succeed
_votes = Counter()  # "accepted" / "duplicate" answers of /feedback
_spans = {}  # endpoint -> [first request's start, last request's end] (epoch seconds), for its rate
_adapters = Counter()  # adapter version that drew each successful /generate ("base" = none)
_started = time.time()


@events.init.add_listener
def _loopback_only(environment, **_):
    host = urlparse(environment.host or "").hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load tests run against loopback only, got --host {environment.host!r}")
    if getattr(environment.parsed_options, "num_users", 0) > MAX_USERS:
        raise SystemExit(f"at most {MAX_USERS} simulated users")


@events.request.add_listener
def _count(name, response_time, exception, **_):
    now = time.time()
    span = _spans.setdefault(name, [now - response_time / 1000, now])
    span[1] = now
    if exception is None:
        _latencies_ms[name].append(response_time)
    else:
        _kinds[(name, str(exception).split(" | ")[0])] += 1


@events.quitting.add_listener
def _write_report(environment, **_):
    if not REPORT:
        return
    wall = time.time() - _started
    names = sorted(set(_latencies_ms) | {name for name, _ in _kinds})
    endpoints = {}
    for name in names:
        ok = np.asarray(_latencies_ms[name], dtype=float)
        failed = sum(count for (n, _), count in _kinds.items() if n == name)
        endpoints[name] = {
            "requests": int(ok.size + failed), "succeeded": int(ok.size), "failed": failed,
            "rps": round((ok.size + failed) / max(_spans[name][1] - _spans[name][0], 1e-3), 3),
            **{f"p{q}_ms": round(float(np.percentile(ok, q)), 1) if ok.size else None for q in (50, 95, 99)},
            "max_ms": round(float(ok.max()), 1) if ok.size else None,
        }
    report = {"wall_s": round(wall, 1), "endpoints": endpoints,
              "errors": [{"endpoint": n, "kind": k, "count": c} for (n, k), c in _kinds.most_common()],
              "votes": dict(_votes), "adapters": dict(_adapters)}
    with open(REPORT, "w") as f:
        json.dump(report, f, indent=1)


class _ServiceUser(HttpUser):
    abstract = True

    def on_start(self):
        self.rng = random.Random()
        self.user_id = f"sim-{self.rng.getrandbits(48):012x}"
        self.headers = {IDENTITY_HEADER: self.user_id} if IDENTITY_HEADER else {}
        self.rater = SimulatedRater(flip=0.1, bias={"count": -0.1, "color": 0.05}, seed=self.rng.getrandbits(32))
        self.prompts = [p.text for p in sample_prompts(self.rng, 20)]

    def post(self, path, body, name, expect_status, check=None):
        """POST and judge the answer; returns the JSON body when it is what was expected, else None."""
        if not IDENTITY_HEADER:
            body = {**body, "user_id": self.user_id}
        with self.client.post(path, json=body, headers=self.headers, name=name, catch_response=True,
                              timeout=600) as response:
            if response.status_code == expect_status:
                problem = check(response.json()) if check else None
                if problem is None:
                    return response.json()
                response.failure(f"wrong answer: {problem}")
            elif response.status_code in (429, 503) and response.headers.get("Retry-After"):
                wait = min(float(response.headers["Retry-After"]), MAX_RETRY_WAIT_S)
                response.failure(f"shed: {response.status_code} {_reason(response)} | retry after {wait}")
                gevent.sleep(wait)
            elif response.status_code in (429, 503):
                response.failure(f"no Retry-After: {response.status_code} {_reason(response)}")
            elif response.status_code == 0:
                response.failure(f"connection: {type(response.error).__name__}")
            else:
                response.failure(f"status {response.status_code}: {_reason(response)} | {response.text[:200]}")
        return None

    def generate(self, prompt, n, k, steps, name="/generate"):
        def check(result):
            if [image["rank"] for image in result["images"]] != list(range(1, k + 1)):
                return "images are not ranked 1..k"
            _adapters[result["adapter"]] += 1
            return None

        return self.post("/generate", {"prompt": prompt, "n": n, "k": k, "steps": steps}, name, 200, check)

    def vote(self, token, vote, expect="accepted", name="/feedback"):
        def check(result):
            return None if result["status"] == expect else f"expected {expect}, got {result['status']}"

        if self.post("/feedback", {"feedback_token": token, "vote": vote}, name, 202, check) is not None:
            _votes[expect] += 1


class MixUser(_ServiceUser):
    wait_time = constant(0)  # the think time is spent looking at the images, inside the task

    @task
    def generate_look_vote(self):
        prompt = self.rng.choice(self.prompts)
        n = self.rng.randint(N_MIN, N_MAX)
        k = self.rng.randint(1, min(K_MAX, n))
        result = self.generate(prompt, n, k, STEPS)
        gevent.sleep(self.rng.uniform(*THINK))
        if result is None:
            return
        for image in result["images"]:
            if self.rng.random() >= CTR:
                continue
            picture = Image.open(io.BytesIO(base64.b64decode(image["image"])))
            vote = self.rater.vote(picture, prompt)
            self.vote(image["feedback_token"], vote)
            if self.rng.random() < REPEAT:  # a double click: must not count twice
                self.vote(image["feedback_token"], vote, expect="duplicate", name="/feedback (repeat)")


class FeedbackBurstUser(_ServiceUser):
    wait_time = constant(0)

    def on_start(self):
        super().on_start()
        self.tokens = []
        while len(self.tokens) < BURST_TOKENS:
            result = self.generate(self.rng.choice(self.prompts), 16, 16, 2, name="/generate (tokens)")
            if result is None:
                continue  # shed: generate() waited as told
            self.tokens += [image["feedback_token"] for image in result["images"]]
        del self.tokens[BURST_TOKENS:]

    @task
    def vote_back_to_back(self):
        if not self.tokens:
            if self.environment.runner.user_count <= 1:  # the last one done: the burst is over, quit before -t
                gevent.spawn_later(0.1, self.environment.runner.quit)
            raise StopUser()
        token, vote = self.tokens.pop(), self.rng.choice(("up", "down"))
        self.vote(token, vote)
        if self.rng.random() < REPEAT:
            self.vote(token, vote, expect="duplicate", name="/feedback (repeat)")


def _reason(response) -> str:
    try:
        return str(response.json().get("reason") or "")
    except ValueError:
        return ""
