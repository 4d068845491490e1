"""The reward model's loop, served end to end: real broker, real service, real CLI.

votes over HTTP -> Kafka -> `feedback snapshot` -> `train reward` -> registry (live) -> the running service
switches to it between requests, without a restart or a failed request, and names it in responses and
events; a broken head published after it is refused while the good one keeps serving.
"""

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
from kafka_fixtures import read_topic
from service_fixtures import start_server, stop_server

from alignloop.events import parse_event
from alignloop.feedback.config import Topics
from alignloop.registry import Registry
from alignloop.world import sample_prompts

pytestmark = pytest.mark.kafka


def _cli(*args, env=None, timeout=900):
    done = subprocess.run([sys.executable, "-m", "alignloop", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_votes_train_a_reward_model_that_the_running_service_switches_to(kafka_broker, tmp_path):
    import os
    import random

    home = tmp_path / "home"
    home.mkdir()
    prefix = f"loop-{uuid.uuid4().hex[:8]}."
    kafka_broker.create_topics(Topics().prefixed(prefix))
    process, url, log_path = start_server(home, kafka_broker.bootstrap, prefix, {
        "ALIGNLOOP_SERVE_REWARD_POLL_S": "1", "ALIGNLOOP_SERVE_EXPLORE_PROBABILITY": "0"})
    import requests

    post = lambda path, body: requests.post(url + path, json=body, timeout=300)  # noqa: E731
    try:
        # 1. Traffic and votes: these users like what the CLIP score ranks second and dislike its first choice,
        #    so a reward model learned from them must differ from the CLIP score (and passes the gate against it).
        for i, prompt in enumerate(sample_prompts(random.Random(0), 24, "seen")):
            result = post("/generate", {"prompt": prompt.text, "n": 4, "k": 2, "steps": 2, "seed": i,
                                        "user_id": f"user-{i % 6}"}).json()
            assert result["reward_model"] == "clip"
            for image, vote in zip(result["images"], ("down", "up")):
                assert post("/feedback", {"feedback_token": image["feedback_token"], "vote": vote,
                                          "user_id": f"user-{i % 6}"}).status_code == 202

        # 2. Snapshot, train, publish (the CLI a nightly job runs).
        env = {**os.environ, "ALIGNLOOP_HOME": str(home)}
        snapshots = tmp_path / "snapshots"
        _cli("feedback", "snapshot", "--out", str(snapshots), "--bootstrap", kafka_broker.bootstrap,
             "--topic-prefix", prefix, "--images", f"file://{home}/images", "--no-progress", env=env)
        report = json.loads(_cli("train", "reward", "--snapshot", str(snapshots), "--epochs", "30",
                                 "--held-out-fraction", "0.3", "--no-progress", "--json", env=env).splitlines()[-1])
        registry = Registry(home / "registry")
        live = registry.live("reward")
        assert live is not None and report["state"] == "live", report
        assert live.data["snapshot_version"] == 1 and live.data["offsets"]

        # 3. The running service switches between requests; none fails while it does.
        failures, stop = [], threading.Event()

        def traffic():
            while not stop.is_set():
                response = post("/generate", {"prompt": "two red circles", "n": 2, "k": 1, "steps": 1})
                if response.status_code != 200:
                    failures.append(response.text)

        background = threading.Thread(target=traffic)
        background.start()
        deadline, name = time.monotonic() + 60, None
        while time.monotonic() < deadline and name != f"reward:{live.version}":
            name = post("/generate", {"prompt": "one blue square", "n": 3, "k": 1, "steps": 1, "seed": 5}).json()["reward_model"]
        stop.set()
        background.join()
        assert name == f"reward:{live.version}" and not failures
        result = post("/generate", {"prompt": "one blue square", "n": 3, "k": 2, "steps": 1, "seed": 6}).json()
        assert result["reward_model"] == name and all(0 <= im["reward"] <= 1 for im in result["images"])
        events = [parse_event(r.value) for r in read_topic(kafka_broker.bootstrap, prefix + "alignloop.generations")]
        [event] = [e for e in events if e.request_id == result["request_id"]]
        assert event.reward_model == name and [im.candidate_index for im in event.images] == \
            [im["candidate_index"] for im in result["images"]]

        # 4. A broken head goes live in the registry: refused, the good one keeps serving.
        broken = registry.publish("reward", {"head.safetensors": b"not a head"}, state="live", who="test",
                                  why="a corrupt upload")
        time.sleep(3)
        result = post("/generate", {"prompt": "one blue square", "n": 2, "k": 1, "steps": 1})
        assert result.status_code == 200 and result.json()["reward_model"] == name
        assert f"reward {broken.version} not swapped in" in log_path.read_text()
    finally:
        stop_server(process)
