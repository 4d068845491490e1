"""The real served service for integration tests (registered in tests/conftest.py's pytest_plugins).

Fixtures:
- `served` (session): `alignloop serve` in a subprocess on a free loopback port, ALIGNLOOP_HOME in a temp dir,
  its producer pointed at the `kafka_broker` fixture with its own prefixed topics, known feedback-token and
  user-hash keys (so tests can mint expired tokens and check hashes), and a previous token key as in the middle
  of a key rotation. Started once per session; waits for /readyz. A `Served`: `.url`, `.bootstrap`, `.topics`,
  `.token_key`, `.previous_token_key`, `.user_hash_key`, `.log_path`, `.post(path, json)`, `.log_text()`.

Tests ask for few steps (the server's default here is 3) to stay quick on a 2-core machine. Servers started by
`start_server` have no rate limits (every test client is 127.0.0.1, one identity to the limiter) unless
`extra_env` sets them; tests/test_serving_abuse.py does.
"""

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from alignloop.feedback.config import Topics
from alignloop.serving import local

STARTUP_TIMEOUT_S = float(os.environ.get("ALIGNLOOP_TEST_SERVE_TIMEOUT_S", 600))


@dataclass
class Served:
    url: str
    bootstrap: str
    topics: Topics
    token_key: bytes
    previous_token_key: bytes
    user_hash_key: bytes
    log_path: Path
    home: Path
    process: subprocess.Popen

    def post(self, path: str, json=None, timeout: float = 300, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 30) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(home: Path, bootstrap: str, topics_prefix: str, extra_env: dict | None = None,
                 port: int | None = None) -> tuple[subprocess.Popen, str, Path]:
    """`alignloop serve` in its own process group; returns (process, url, log path) once /readyz says 200."""
    server = local.start_server(home, {
        "ALIGNLOOP_SERVE_KAFKA_BOOTSTRAP": bootstrap,
        "ALIGNLOOP_SERVE_TOPIC_PREFIX": topics_prefix,
        "ALIGNLOOP_SERVE_DEFAULT_STEPS": "3",
        **local.NO_RATE_LIMITS,
        **(extra_env or {}),
    }, port=port, timeout_s=STARTUP_TIMEOUT_S)
    return server.process, server.url, server.log_path


def stop_server(process: subprocess.Popen) -> None:
    local.stop_process_group(process)


@pytest.fixture(scope="session")
def served(kafka_broker, tmp_path_factory):
    home = tmp_path_factory.mktemp("serving-home")
    prefix = f"serve-{uuid.uuid4().hex[:8]}."
    topics = kafka_broker.create_topics(Topics().prefixed(prefix))
    token_key = uuid.uuid4().hex.encode()
    previous_token_key = uuid.uuid4().hex.encode()
    user_hash_key = uuid.uuid4().hex.encode()
    process, url, log_path = start_server(home, kafka_broker.bootstrap, prefix, {
        "ALIGNLOOP_FEEDBACK_TOKEN_KEY": token_key.decode(),
        "ALIGNLOOP_FEEDBACK_TOKEN_KEY_PREVIOUS": previous_token_key.decode(),
        "ALIGNLOOP_USER_HASH_KEY": user_hash_key.decode(),
    })
    try:
        yield Served(url, kafka_broker.bootstrap, topics, token_key, previous_token_key, user_hash_key, log_path, home,
                     process)
    finally:
        stop_server(process)
