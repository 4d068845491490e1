"""Shared test set-up. Stage-specific fixtures live in their own modules, listed in pytest_plugins."""

import atexit
import os
import shutil
import tempfile
import uuid

import fsspec
import pytest

# Triton's interpreter must be chosen before any kernel module is imported (CPU-only machines).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the user's own state or a model hub. (Downloads such as the Kafka jars stay shared,
# under ALIGNLOOP_CACHE.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "ALIGNLOOP_HOME" not in os.environ:
    os.environ["ALIGNLOOP_HOME"] = tempfile.mkdtemp(prefix="alignloop-test-home-")
    atexit.register(shutil.rmtree, os.environ["ALIGNLOOP_HOME"], ignore_errors=True)

pytest_plugins = ["kafka_fixtures", "service_fixtures", "finetune_fixtures"]


@pytest.fixture
def own_registry_home(tmp_path, monkeypatch):
    """The test's own ALIGNLOOP_HOME (the registry's fetch cache) and no ALIGNLOOP_REGISTRY from outside."""
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ALIGNLOOP_REGISTRY", raising=False)


@pytest.fixture(params=["local", "memory"])
def registry_url(request, tmp_path):
    """A fresh registry URL, once a local folder and once fsspec's memory:// (removed afterwards)."""
    if request.param == "local":
        yield str(tmp_path / "registry")
        return
    url = f"memory://registry-{uuid.uuid4().hex}"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory:/"), recursive=True)
