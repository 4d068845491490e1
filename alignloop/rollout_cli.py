"""`alignloop adapters ...` and `alignloop rollout ...`: the adapters' life cycle, the rollout and its guardrail.

    alignloop adapters list                                  # versions, states, which arm serves each
    alignloop adapters publish out/adapter --why "rwr, oracle 0.61" --base '{"generator": "shapes-sd-tiny"}'
    alignloop rollout canary v000007 --share 0.1 --why "nightly 2026-11-28"
    alignloop rollout watch --once                           # the guardrail: promote or roll back B, or wait
    alignloop adapters promote v000007 --why "looks good"    # by hand: every user on v000007
    alignloop adapters rollback --why "artifacts in faces"   # undo one step
    alignloop rollout show

Changes need --why, and record --who (default: $USER@host) with the time in the adapters' and the rollout's
history. --registry takes any fsspec URL or a local path (default: ALIGNLOOP_REGISTRY, else ALIGNLOOP_HOME/registry).
"""

import argparse
import json
import os
import socket

from alignloop.registry_cli import add_registry_arg, headline, print_manifests_json, print_table


def add_commands(subparsers) -> None:
    from alignloop.cli import add_config_args
    from alignloop.guardrail import GuardrailConfig

    adapters = subparsers.add_parser(
        "adapters", help="LoRA adapters in the registry: list, show, publish, promote, rollback, retire",
        description="States: candidate (published), canary (arm B of the rollout), live (arm A), retired. Every "
                    "change is recorded with who, why and when, and publishes the rollout that follows from it.")
    asub = adapters.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")

    p = asub.add_parser("list", help="adapter versions as a table: state, the arm serving each, headline metric")
    add_registry_arg(p)
    p.add_argument("--json", action="store_true", help="print the manifests as one JSON array instead of a table")
    p.set_defaults(func=_list)

    p = asub.add_parser("show", help="one adapter's manifest as JSON (lineage, base model, metrics, history)")
    p.add_argument("version", help="adapter version, e.g. v000007")
    add_registry_arg(p)
    p.set_defaults(func=_show)

    p = asub.add_parser("publish", help="publish a LoRA folder (pytorch_lora_weights.safetensors) as a candidate",
                        description="The folder's files become the version; the LoRA file must parse and hold only "
                                    "finite weights. Serving checks it against the base UNet before it takes traffic.")
    p.add_argument("folder", help="folder holding pytorch_lora_weights.safetensors (what save_adapter writes)")
    p.add_argument("--parent", default=None, help="the adapter version it was fine-tuned from")
    for name, what in (("base", "base model ids and hashes"), ("config", "training config"),
                       ("metrics", "evaluation metrics; the first is the headline"),
                       ("data", "training data: snapshot version, Kafka offsets")):
        p.add_argument(f"--{name}", type=_json_object, default=None, help=f"{what}, as a JSON object")
    _change_args(p)
    p.set_defaults(func=_publish)

    p = asub.add_parser("promote", help="make a candidate or canary live for every user (arm A, 100%%)",
                        description="The previous live adapter and any other canary are retired.")
    p.add_argument("version", help="adapter version, e.g. v000007")
    _change_args(p)
    p.set_defaults(func=_promote)

    p = asub.add_parser("rollback", help="undo one step: retire the canary, else go back to the previous live adapter",
                        description="With a canary out, it is retired and every user gets the live adapter. Without, "
                                    "the live adapter is retired and the one before it (or the base model) serves.")
    _change_args(p)
    p.set_defaults(func=_rollback)

    p = asub.add_parser("retire", help="serve an adapter no more (a canary's users go back to the other arms)")
    p.add_argument("version", help="adapter version, e.g. v000007")
    _change_args(p)
    p.set_defaults(func=_retire)

    rollout = subparsers.add_parser(
        "rollout", help="which adapters serve which share of users: show, canary, watch (the guardrail)",
        description="A rollout is a registry version (kind rollout) of the arms: A = the live adapter or the base "
                    "model, B = the canary. Serving workers follow the newest one.")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")

    p = rsub.add_parser("show", help="the current rollout: arms, shares, the adapters' states, why")
    add_registry_arg(p)
    p.add_argument("--json", action="store_true", help="print the rollout as JSON")
    p.set_defaults(func=_rollout_show)

    p = rsub.add_parser("canary", help="serve a candidate adapter to a share of users as arm B",
                        description="Arm A keeps the live adapter (or the base model) for the other users. Users are "
                                    "assigned by a hash of their id and the new rollout's id, so each canary draws a "
                                    "new B population. Promote or roll it back by hand (`alignloop adapters promote"
                                    "|rollback`) or let `alignloop rollout watch` decide.")
    p.add_argument("version", help="adapter version, e.g. v000007")
    p.add_argument("--share", type=float, default=0.1, help="fraction of users in arm B, in (0, 1) (default 0.1)")
    _change_args(p)
    p.set_defaults(func=_canary)

    p = rsub.add_parser("watch", help="the guardrail: count arm A's and B's thumbs, promote or roll back B",
                        description="Reads the feedback and generation topics from the rollout's start; promotes B "
                                    "when P(B > A + min lift) >= --promote-probability and the expected loss <= "
                                    "--max-expected-loss, rolls it back when P(B > A) <= --rollback-probability or "
                                    "on suspected reward hacking, retires it as inconclusive after --max-exposure-s; "
                                    "nothing below --min-votes votes an arm. Prints decisions as JSON lines.")
    p.add_argument("--once", action="store_true", help="read what is there, decide once, exit")
    p.add_argument("--bootstrap", default=None, help="default: ALIGNLOOP_KAFKA or 127.0.0.1:9092")
    p.add_argument("--topic-prefix", default="", help="read <prefix>alignloop.generations / <prefix>alignloop.feedback")
    p.add_argument("--who", default="guardrail", help="recorded with each decision (default: guardrail)")
    add_registry_arg(p)
    add_config_args(p, GuardrailConfig())
    for action in p._actions:  # add_config_args says only the default; say what each threshold is
        if action.dest in _GUARDRAIL_HELP:
            action.help = f"{_GUARDRAIL_HELP[action.dest]} {action.help}"
    p.set_defaults(func=_watch)


_GUARDRAIL_HELP = {  # alignloop.guardrail.GuardrailConfig argues each default
    "min_votes": "votes each arm needs before any decision",
    "promote_probability": "P(B > A + min lift) needed to promote B",
    "min_lift": "thumbs-up rate B must beat A by, for --promote-probability",
    "max_expected_loss": "largest expected loss of shipping B (thumbs-up rate) that still promotes",
    "rollback_probability": "roll B back when P(B > A) is at or below this",
    "max_exposure_s": "seconds after the rollout started to retire an undecided B as inconclusive",
    "reward_margin_sd": "reward hacking: B's reward-model mean above A's by this many pooled sd ...",
    "hacking_probability": "... while P(B < A) for the thumbs-up rate is at least this",
    "draws": "Monte Carlo draws per posterior",
    "seed": "seed of the draws (the same counts always give the same decision)",
    "poll_s": "seconds between looks when watching",
    "lookback_s": "seconds before the rollout's start to begin reading the topics (clock drift)",
    "read_timeout_s": "seconds one read to the end of the topics may take",
}


# -- arguments ----------------------------------------------------------------------------------------------


def _change_args(parser) -> None:
    parser.add_argument("--why", required=True, help="the reason, recorded in the history")
    parser.add_argument("--who", default=default_who(), help="recorded in the history (default: $USER@host)")
    add_registry_arg(parser)


def default_who() -> str:
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    return f"{user}@{socket.gethostname()}" if user else "cli"


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {text!r}")
    return value


# -- adapters -----------------------------------------------------------------------------------------------


def _list(args) -> int:
    from alignloop.registry import Registry
    from alignloop.rollout import current_rollout

    registry = Registry(args.registry)
    manifests = registry.versions("adapter")
    if args.json:
        print_manifests_json(manifests)
        return 0
    if not manifests:
        print(f"no adapter versions in {registry.url}")
        return 0
    current = current_rollout(registry)
    arms = {arm.adapter: f"{arm.name}:{arm.share:.0%}" for arm in (current.arms if current else [])}
    rows = [("VERSION", "STATE", "ARM", "CREATED (UTC)", "PARENT", "HEADLINE")]
    rows += [(m.version, m.state, arms.get(m.version, "-"), m.created_at.strftime("%Y-%m-%d %H:%M"), m.parent or "-",
              headline(m.metrics)) for m in manifests]
    print_table(rows)
    if current is not None and "base" in arms:
        print(f"base model: arm {arms['base']}")
    return 0


def _show(args) -> int:
    from alignloop.registry import Registry

    print(Registry(args.registry).get("adapter", args.version).to_json(), end="")
    return 0


def _publish(args) -> int:
    from alignloop.registry import Registry
    from alignloop.rollout import publish_adapter

    m = publish_adapter(Registry(args.registry), args.folder, base=args.base, config=args.config, metrics=args.metrics,
                        data=args.data, parent=args.parent, who=args.who, why=args.why)
    print(f"adapter {m.version} published as {m.state}")
    return 0


def _promote(args) -> int:
    from alignloop.registry import Registry
    from alignloop.rollout import promote

    after = promote(Registry(args.registry), args.version, args.who, args.why)
    print(f"adapter {args.version} is live; rollout {after.describe()}")
    return 0


def _rollback(args) -> int:
    from alignloop.registry import Registry
    from alignloop.rollout import rollback

    print(f"rolled back; rollout {rollback(Registry(args.registry), args.who, args.why).describe()}")
    return 0


def _retire(args) -> int:
    from alignloop.registry import Registry
    from alignloop.rollout import current_rollout, retire

    registry = Registry(args.registry)
    retire(registry, args.version, args.who, args.why)
    current = current_rollout(registry)
    print(f"adapter {args.version} is retired" + (f"; rollout {current.describe()}" if current else ""))
    return 0


# -- rollout ------------------------------------------------------------------------------------------------


def _rollout_show(args) -> int:
    from alignloop.registry import Registry
    from alignloop.rollout import BASE, current_rollout, problems

    registry = Registry(args.registry)
    current = current_rollout(registry)
    if args.json:
        print(current.model_dump_json(indent=2) if current else "null")
        return 0
    if current is None:
        print(f"no rollout in {registry.url}: serving uses its configured arms")
        return 0
    manifest = registry.get("rollout", current.id)
    print(f"rollout {current.id}, since {current.started_at:%Y-%m-%d %H:%M:%S} UTC, by {manifest.history[-1].who}: "
          f"{current.reason}")
    rows = [("ARM", "SHARE", "ADAPTER", "STATE")]
    rows += [(arm.name, f"{arm.share:.1%}", arm.adapter,
              "-" if arm.adapter == BASE else registry.get("adapter", arm.adapter).state) for arm in current.arms]
    print_table(rows)
    for problem in problems(registry, current):
        print(f"warning: {problem}")
    return 0


def _canary(args) -> int:
    from alignloop.registry import Registry
    from alignloop.rollout import start_canary

    print(f"adapter {args.version} is in canary; rollout "
          f"{start_canary(Registry(args.registry), args.version, args.share, args.who, args.why).describe()}")
    return 0


def _watch(args) -> int:
    import logging

    from alignloop.cli import config_from_args
    from alignloop.feedback import broker
    from alignloop.feedback.config import Topics
    from alignloop.guardrail import GuardrailConfig, GuardrailError, watch
    from alignloop.settings import kafka_bootstrap

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    config = config_from_args(GuardrailConfig, args)
    bootstrap = args.bootstrap or kafka_bootstrap()
    if not broker.reachable(bootstrap):
        raise GuardrailError(f"no Kafka broker answers at {bootstrap}; start one with `alignloop kafka up`")
    decision = watch(bootstrap, Topics().prefixed(args.topic_prefix), args.registry, config, once=args.once,
                     who=args.who, emit=lambda line: print(line, flush=True))
    if args.once and decision is None:
        print(json.dumps({"action": "none", "reason": "no canary in the current rollout"}))
    return 0
