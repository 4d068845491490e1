"""Settings every part shares: where state lives on disk and how to reach Kafka.

Each subpackage keeps its own typed config beside its code; this module holds only what crosses them.
"""

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def home() -> Path:
    """Root for runtime state outside the clone (broker data, spool, secrets, caches)."""
    path = Path(os.environ.get("ALIGNLOOP_HOME", Path.home() / ".cache" / "alignloop"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def kafka_bootstrap() -> str:
    """Comma-separated bootstrap servers; the single-node broker from `alignloop kafka up` by default."""
    return os.environ.get("ALIGNLOOP_KAFKA", "127.0.0.1:9092")
