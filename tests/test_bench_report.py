"""`alignloop bench report` with fake benchmark subprocesses: collecting, parsing, failures, the README table.

The real benchmarks never run here (they take minutes to hours); `make bench-quick` runs them in CI.
"""

import json
import sys

import pytest

from alignloop import bench_report
from alignloop.bench_report import BEGIN, END, Bench

# A stand-in for `alignloop bench NAME --json`: its mode decides how it behaves.
FAKE = r'''
import json, sys, time
mode = sys.argv[1]
print("progress noise")
if mode == "ok":
    print(json.dumps({"benchmark": "fake", "machine": {"cpu": "Fake CPU", "cpu_count": 2, "load_average_1m": 0.5},
                      "settings": {"n": 1}, "ratio": 1.25, "ratio_means": "ours / theirs", "seconds": 3.5,
                      "goals_met": True, "latency": {"p50": 1.0}}))
elif mode == "fail":
    print("Traceback ...\nRuntimeError: the broker went away", file=sys.stderr)
    sys.exit(3)
elif mode == "not-json":
    print("ratio: 1.25")
elif mode == "sleep":
    time.sleep(60)
'''


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE)
    # Each fake bench's name is the mode its subprocess runs in.
    return lambda bench, quick, bootstrap: [sys.executable, str(script), bench.name]


def fake_benches(*modes):
    return [Bench(mode, f"headline of {mode}", full_limit_s=60, quick_limit_s=2) for mode in modes]


def test_every_bench_command_is_in_the_report():
    from alignloop.cli import build_parser

    bench_parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()
                        if a.prog.endswith(" bench"))
    names = set(bench_parser._subparsers._group_actions[0].choices) - {"report"}
    assert names == {b.name for b in bench_report.BENCHES}


def test_bench_argv_quick_full_and_bootstrap():
    by_name = {b.name: b for b in bench_report.BENCHES}
    argv = bench_report.bench_argv(by_name["feedback"], quick=True, bootstrap="127.0.0.1:1234")
    assert argv[:4] == [sys.executable, "-m", "alignloop", "bench"]
    assert argv[4:] == ["feedback", "--quick", "--bootstrap", "127.0.0.1:1234", "--json"]
    assert bench_report.bench_argv(by_name["serving"], quick=False, bootstrap="x")[4:] == ["serving", "--json"]
    assert bench_report.bench_argv(by_name["generator"], quick=True, bootstrap=None)[4:] == [
        "generator", "--repeats", "1", "--json"]


def test_collects_figures_and_records_failures(tmp_path, fake):
    records = bench_report.run_benches(fake_benches("ok", "fail", "not-json", "sleep"), quick=True,
                                       log_dir=tmp_path / "logs", argv_for=fake, log=lambda m: None)
    assert list(records) == ["ok", "fail", "not-json", "sleep"]  # a failure does not stop the others

    ok = records["ok"]
    assert ok["ok"] and ok["ratio"] == 1.25 and ok["ratio_means"] == "ours / theirs"
    assert ok["machine"]["cpu"] == "Fake CPU"
    assert ok["figures"] == {"seconds": 3.5}  # top-level numbers only: no bools, dicts or the ratio itself
    assert ok["result"]["latency"] == {"p50": 1.0}

    assert not records["fail"]["ok"]
    assert records["fail"]["error"] == "exit status 3"
    assert "RuntimeError: the broker went away" in records["fail"]["stderr_tail"]
    assert "not a JSON object" in records["not-json"]["error"] and "ratio: 1.25" in records["not-json"]["error"]
    assert records["sleep"]["error"] == "timed out after 2 s" and records["sleep"]["seconds"] < 30


def test_report_writes_json_and_exits_non_zero_when_one_fails(tmp_path, monkeypatch, fake):
    from alignloop.cli import main

    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(bench_report, "BENCHES", fake_benches("ok", "fail"))
    monkeypatch.setattr(bench_report, "bench_argv", fake)
    out = tmp_path / "results.json"
    assert main(["bench", "report", "--quick", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["machine"]["cpu_count"] >= 1 and report["date"]
    assert report["benches"]["ok"]["ok"] and not report["benches"]["fail"]["ok"]

    # --only reruns a subset and keeps the other records.
    assert main(["bench", "report", "--quick", "--only", "ok", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["benches"]) == {"ok", "fail"}


def test_quick_run_never_touches_the_readme_or_bench_results(tmp_path, monkeypatch, fake, capsys):
    from alignloop.cli import main

    monkeypatch.setenv("ALIGNLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_report, "BENCHES", fake_benches("ok"))
    monkeypatch.setattr(bench_report, "bench_argv", fake)
    assert main(["bench", "report", "--quick", "--readme", "README.md"]) == 2
    assert "--readme is for full runs" in capsys.readouterr().err
    assert main(["bench", "report", "--quick"]) == 0
    assert (tmp_path / "home" / "bench" / "results-quick.json").exists()
    assert not (tmp_path / "bench").exists()


def test_table_between_markers_keeps_the_rest(tmp_path, fake):
    records = bench_report.run_benches(fake_benches("ok", "fail"), quick=False, log_dir=tmp_path / "logs",
                                       argv_for=fake, log=lambda m: None)
    table = bench_report.render_table({"benches": records})
    assert "| `bench ok` | **1.25** | headline of ok |" in table
    assert "Fake CPU, 2 cores, load 0.5" in table
    assert "| `bench fail` | failed: exit status 3 |" in table

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter, by hand\n")
    bench_report.rewrite_readme(readme, table)
    text = readme.read_text()
    assert "old table" not in text and table in text
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{END}\n\nafter, by hand\n")

    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench-table:start"):
        bench_report.rewrite_readme(readme, table)


def test_a_kafka_bench_gets_the_bootstrap_and_a_broker_that_fails_fails_only_it(tmp_path, monkeypatch, fake):
    import contextlib

    seen = []

    @contextlib.contextmanager
    def fake_kafka(log):
        yield "127.0.0.1:1"

    def argv(bench, quick, bootstrap):
        seen.append(bootstrap)
        return fake(bench, quick, bootstrap)

    kafka_bench = Bench("ok", "", full_limit_s=60, quick_limit_s=10, needs_kafka=True)
    monkeypatch.setattr(bench_report, "_kafka", fake_kafka)
    records = bench_report.run_benches([kafka_bench], quick=True, log_dir=tmp_path, argv_for=argv, log=lambda m: None)
    assert records["ok"]["ok"] and seen == ["127.0.0.1:1"]

    @contextlib.contextmanager
    def broken_kafka(log):
        raise RuntimeError("no java")
        yield

    monkeypatch.setattr(bench_report, "_kafka", broken_kafka)
    records = bench_report.run_benches([kafka_bench, Bench("fail", "", 60, 10)], quick=True,
                                       log_dir=tmp_path, argv_for=fake, log=lambda m: None)
    assert records["ok"]["error"] == "RuntimeError: no java"
    assert records["fail"]["error"] == "exit status 3"  # the next bench still ran
