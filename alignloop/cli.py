"""The `alignloop` command line.

Each subpackage registers its own commands through an `add_commands(subparsers)` function in its `cli`
module (and benchmarks through `add_benchmarks(bench_subparsers)`), so this file stays a table of
contents. Heavy imports (torch, diffusers) happen inside the command functions, keeping `--help` fast.
"""

import argparse
import dataclasses
import importlib
import sys

from alignloop.errors import UserFacingError  # noqa: F401  (re-exported for command modules)

# Modules that contribute commands; each exposes add_commands and/or add_benchmarks.
COMMAND_MODULES = [
    "alignloop.world.cli",
    "alignloop.generate_cli",
    "alignloop.registry_cli",
    "alignloop.rollout_cli",
    "alignloop.feedback.cli",
    "alignloop.serving.cli",
    "alignloop.kernels.cli",
    "alignloop.trainer.cli",
    "alignloop.bench_report",  # last: `bench report` runs the benchmarks above
]


def add_config_args(parser: argparse.ArgumentParser, config) -> None:
    """One flag per field of a config dataclass, its default the config's: --lr 1e-3, --hidden 256 256 (tuples take
    several values), --classify-downvoted / --no-classify-downvoted (booleans)."""
    for field in dataclasses.fields(config):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(config, field.name)
        what = field.metadata.get("help", "")  # a field's own help text, where it has one: "... (default 1)"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{what} (default {default})".strip())
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs="+", default=default,
                                help=f"{what} (default {' '.join(map(str, default))})".strip())
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"{what} (default {default})".strip())


def config_to_args(config) -> list:
    """The flags of `add_config_args` that give back `config` (to hand a config to another `alignloop` process)."""
    args = []
    for field in dataclasses.fields(config):
        flag, value = "--" + field.name.replace("_", "-"), getattr(config, field.name)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]  # str(float) round-trips exactly
    return args


def config_from_args(config_class, args, base: dict = None):
    """The config built from the flags `add_config_args` made (tuple fields as tuples); a field the args lack (a flag
    whose default was suppressed and that was not given) comes from `base`, else the class default. A field's
    ValueError ("lr must be > 0, got 0") comes back as the flag's ("--lr must be > 0, got 0"), a one-line error for
    the user."""
    from alignloop.errors import UserFacingError

    fields = dict(base or {})
    for f in dataclasses.fields(config_class):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            fields[f.name] = tuple(value) if isinstance(value, list) else value  # nargs="+" flags give lists
    try:
        return config_class(**fields)
    except ValueError as err:
        field, _, rest = str(err).partition(" ")
        raise UserFacingError(f"--{field.replace('_', '-')} {rest}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignloop",
        description="Text-to-image serving that learns from its users: reward-ranked best-k-of-n sampling, "
        "thumbs feedback over Kafka, reward-model and LoRA training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser(
        "bench",
        help="benchmarks: one JSON object on the last line with the machine, settings and a headline ratio",
        description="Benchmarks compare side by side in one run and print one JSON object on the last line.",
    )
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a stage not built yet contributes no commands
                continue
            raise
        if hasattr(module, "add_commands"):
            module.add_commands(sub)
        if hasattr(module, "add_benchmarks"):
            module.add_benchmarks(bench_sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except UserFacingError as err:
        print(f"alignloop: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
