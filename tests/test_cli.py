"""Every CLI command has --help; world eval prints one JSON object on its last line."""

import argparse
import json
import subprocess
import sys

from alignloop.cli import build_parser
from alignloop.world.grammar import split


def _commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _commands(sub, prefix + (name,))


def test_every_command_has_help(capsys):
    commands = list(_commands(build_parser()))
    assert ("world", "eval") in commands and ("generate",) in commands
    for command in commands:
        try:
            build_parser().parse_args(list(command) + ["--help"])
        except SystemExit as exit:
            assert exit.code == 0, command
        out = capsys.readouterr().out
        assert "usage: alignloop " + " ".join(command) in out


def test_world_eval_prints_pass_rates_as_json():
    result = subprocess.run([sys.executable, "-m", "alignloop", "world", "eval", "--split", "unseen",
                             "--per-prompt", "2", "--max-prompts", "6", "--steps", "5", "--json"],
                            capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["split"] == "unseen" and report["images"] == 12 and len(report["seeds"]) == 12
    assert 0.0 <= report["overall"] <= 1.0
    assert set(report["aspects"]) <= {"count", "color", "shape", "background"} and "count" in report["aspects"]
    # Reproducible: the same seeds give the same verdicts.
    again = subprocess.run(result.args, capture_output=True, text=True, check=True)
    assert json.loads(again.stdout.strip().splitlines()[-1])["overall"] == report["overall"]


def test_world_commands_reject_bad_counts_with_a_message():
    for args, message in ((["world", "eval", "--per-prompt", "0"], "--per-prompt must be >= 1, got 0"),
                          (["world", "eval-clip", "--renders", "0"], "--renders must be >= 1, got 0"),
                          (["bench", "generator", "--repeats", "0"], "--repeats must be in 1..1000, got 0"),
                          (["bench", "generator", "--images", "999"], f"--images must be in 1..{len(split('seen'))}, got 999")):
        result = subprocess.run([sys.executable, "-m", "alignloop", *args], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_generator_benchmark_times_the_call_against_the_budget():
    result = subprocess.run([sys.executable, "-m", "alignloop", "bench", "generator", "--images", "2", "--steps", "2",
                             "--repeats", "2", "--budget", "1000", "--json"], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["settings"] == {"images": 2, "steps": 2, "guidance": 5.0, "repeats": 2, "device": "cpu",
                                  "dtype": "float32"} and len(report["seconds"]) == 2
    assert report["ratio"] == round(1000 / report["seconds_median"], 3) and report["machine"]["cpu_count"] >= 1


def test_training_flags_fill_the_config_including_per_level_tuples():
    from alignloop.cli import config_from_args
    from alignloop.world.config import GeneratorTrainConfig

    args = build_parser().parse_args(["world", "train-generator", "--unet-channels", "48", "64", "96",
                                      "--unet-attention", "0", "1", "1", "--unet-lr", "1e-3"])
    config = config_from_args(GeneratorTrainConfig, args)
    assert config.unet_channels == (48, 64, 96) and config.unet_attention == (0, 1, 1) and config.unet_lr == 1e-3
    assert config_from_args(GeneratorTrainConfig, build_parser().parse_args(["world", "train-generator"])) \
        == GeneratorTrainConfig()


def test_broker_commands_name_the_unreachable_broker():
    for args in (["kafka", "topics"], ["feedback", "snapshot", "--out", "unused"]):
        result = subprocess.run([sys.executable, "-m", "alignloop", *args, "--bootstrap", "127.0.0.1:1"],
                                capture_output=True, text=True)
        assert result.returncode == 2 and "no Kafka broker answers at 127.0.0.1:1" in result.stderr, args
        assert "Traceback" not in result.stderr
