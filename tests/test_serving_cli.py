"""`alignloop serve` / `alignloop bench serving` argument handling (no server started)."""

import subprocess
import sys

from alignloop.cli import build_parser, main
from alignloop.serving.cli import serving_config_from_args


def test_serve_and_bench_are_registered():
    parser = build_parser()
    args = parser.parse_args(["serve", "--port", "3100", "--workers", "2", "--no-batching", "--max-batch-images", "32"])
    config = serving_config_from_args(args)
    assert (args.port, config.workers, config.cross_request_batching, config.max_batch_images) == (3100, 2, False, 32)
    proxied = serving_config_from_args(parser.parse_args(["serve", "--identity-header", "X-Forwarded-User"]))
    assert proxied.identity_header == "X-Forwarded-User"
    bench = parser.parse_args(["bench", "serving", "--quick", "--json"])
    assert bench.quick and bench.json
    swap = parser.parse_args(["bench", "swap", "--quick", "--json"])
    assert swap.quick and swap.json and swap.swaps == 50 and swap.clients == 8


def test_serve_reports_a_missing_generator_as_a_user_error(capsys, tmp_path):
    assert main(["serve", "--generator", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_serve_rejects_bad_worker_counts(capsys):
    assert main(["serve", "--workers", "0"]) == 2
    assert "workers must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--identity-header", "X user"]) == 2
    assert "identity_header must be a header name" in capsys.readouterr().err


def test_serve_help_is_fast():
    run = subprocess.run([sys.executable, "-m", "alignloop", "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--workers" in run.stdout
