"""Simulated users against a running service: generate, look, vote (locust).

Each user draws shapes-world prompts, asks for the best k of n, judges every returned image with the
oracle through `alignloop.world.SimulatedRater` (noisy, biased thumbs) and sends the vote with the image's
feedback token; now and then it repeats a vote, which the service must answer as a duplicate.
Loopback only, bounded in users, run time and steps:

    alignloop serve --port 3000 &
    locust -f load_tests/locustfile.py --headless -u 4 -r 2 -t 60s --host http://127.0.0.1:3000 \
        --only-summary --exit-code-on-error 1

Knobs (environment): ALIGNLOOP_LOAD_N (8), ALIGNLOOP_LOAD_K (2), ALIGNLOOP_LOAD_STEPS (4).
"""

import base64
import io
import os
import random
from urllib.parse import urlparse

from locust import HttpUser, between, events, task
from PIL import Image

from alignloop.world import SimulatedRater, sample_prompts

N = int(os.environ.get("ALIGNLOOP_LOAD_N", 8))
K = int(os.environ.get("ALIGNLOOP_LOAD_K", 2))
STEPS = int(os.environ.get("ALIGNLOOP_LOAD_STEPS", 4))
MAX_USERS = 32


@events.init.add_listener
def _loopback_only(environment, **_):
    host = urlparse(environment.host or "").hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load tests run against loopback only, got --host {environment.host!r}")
    runner = environment.runner
    if runner is not None and getattr(environment.parsed_options, "num_users", 0) > MAX_USERS:
        raise SystemExit(f"at most {MAX_USERS} simulated users")


class SimulatedUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self):
        self.rng = random.Random()
        self.user_id = f"sim-{self.rng.getrandbits(48):012x}"
        self.rater = SimulatedRater(flip=0.1, bias={"count": -0.1, "color": 0.05}, seed=self.rng.getrandbits(32))
        self.prompts = [p.text for p in sample_prompts(self.rng, 20)]

    @task
    def generate_and_vote(self):
        prompt = self.rng.choice(self.prompts)
        body = {"prompt": prompt, "n": N, "k": K, "steps": STEPS, "user_id": self.user_id}
        with self.client.post("/generate", json=body, name="/generate", catch_response=True, timeout=600) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            result = response.json()
            if [im["rank"] for im in result["images"]] != list(range(1, K + 1)):
                response.failure("images are not ranked 1..k")
                return
        for image in result["images"]:
            picture = Image.open(io.BytesIO(base64.b64decode(image["image"])))
            vote = {"feedback_token": image["feedback_token"], "vote": self.rater.vote(picture, prompt),
                    "user_id": self.user_id}
            self._feedback(vote, expect="accepted")
            if self.rng.random() < 0.2:  # a double click: must not count twice
                self._feedback(vote, expect="duplicate", name="/feedback (repeat)")

    def _feedback(self, vote, expect, name="/feedback"):
        with self.client.post("/feedback", json=vote, name=name, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif response.json()["status"] != expect:
                response.failure(f"expected {expect}, got {response.json()['status']}")
