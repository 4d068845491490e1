"""Shared test set-up. Stage-specific fixtures live in their own modules, listed in pytest_plugins."""

import os

# Triton's interpreter must be chosen before any kernel module is imported (CPU-only machines).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the user's own state or a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["kafka_fixtures", "service_fixtures"]
