"""Secrets created on first use: one key, whoever is first, never a half-written one."""

import stat
import threading

from alignloop import secrets


def test_concurrent_first_use_agrees_on_one_complete_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    monkeypatch.delenv("ALIGNLOOP_RACE_KEY", raising=False)
    barrier, keys, errors = threading.Barrier(16), [], []

    def first_use():
        barrier.wait()
        try:
            keys.append(secrets.load_secret("race_key"))
        except Exception as err:  # a 500 in serving before the fix: FileExistsError
            errors.append(err)

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(keys)) == 1 and len(keys[0]) == 64
    path = secrets.secret_path("race_key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["race_key"]  # no temporary files left behind


def test_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("ALIGNLOOP_RACE_KEY", "from-env")
    assert secrets.load_secret("race_key") == b"from-env"
    assert not secrets.secret_path("race_key").exists()
