"""Secrets (feedback-token key, user-id hash key, admin token): from the environment, else a file.

`ALIGNLOOP_<NAME>` wins; otherwise `<ALIGNLOOP_HOME>/secrets/<name>` is read, and on first use created with
32 random bytes, mode 0600, outside the repository. Nothing secret is ever committed. `optional_secret` reads
one that exists only when an operator put it there (the previous feedback-token key, during a rotation).
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
        # Several threads (or workers) may be first at once: each writes a complete key to its own file and
        # links it into place; one link wins, the others read the winner's. A reader never sees a half-written
        # key, and nobody fails because another was first.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mine = path.with_name(f".{name}.{os.getpid()}.{_random.token_hex(8)}")
        fd = os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_random.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(mine, path)
            except FileExistsError:
                pass
        finally:
            mine.unlink()
    return path.read_text().strip().encode()


def optional_secret(name: str) -> bytes | None:
    """Like load_secret, but None (never created) when neither the variable nor the file is there."""
    env = os.environ.get(f"ALIGNLOOP_{name.upper()}")
    if env:
        return env.encode()
    path = secret_path(name)
    return path.read_text().strip().encode() if path.exists() else None


def secret_path(name: str) -> Path:
    return home() / "secrets" / name
