"""Secrets (feedback-token key, user-id hash key, admin token): from the environment, else a file.

`ALIGNLOOP_<NAME>` wins; otherwise `<ALIGNLOOP_HOME>/secrets/<name>` is read, and on first use created with
32 random bytes, mode 0600, outside the repository. Nothing secret is ever committed.
"""

import os
import secrets as _random
from pathlib import Path

from alignloop.settings import home


def load_secret(name: str) -> bytes:
    env = os.environ.get(f"ALIGNLOOP_{name.upper()}")
    if env:
        return env.encode()
    path = secret_path(name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_random.token_hex(32))
    return path.read_text().strip().encode()


def secret_path(name: str) -> Path:
    return home() / "secrets" / name
