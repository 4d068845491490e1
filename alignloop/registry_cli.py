"""`alignloop registry list` and `alignloop registry show`: what the artifact registry holds.

    alignloop registry list                       # every kind, as a table
    alignloop registry list --kind reward --json  # the manifests, as one JSON array
    alignloop registry show reward v000003        # one manifest, as JSON

--registry takes any fsspec URL or a local path (default: ALIGNLOOP_REGISTRY, else ALIGNLOOP_HOME/registry).
"""

import json


def add_registry_arg(parser) -> None:
    """--registry, for every command that reads or changes the registry."""
    parser.add_argument("--registry", default=None,
                        help="fsspec URL or local folder (default: ALIGNLOOP_REGISTRY, else ALIGNLOOP_HOME/registry)")


def add_commands(subparsers) -> None:
    registry = subparsers.add_parser(
        "registry", help="versioned artifacts (reward heads, LoRA adapters, rollouts): list, show",
        description="Each version is a folder with its files and a manifest (lineage, training data, metrics, "
                    "state: candidate / canary / live / retired), visible only once complete.")
    rsub = registry.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    p = rsub.add_parser("list", help="complete versions as a table: kind, version, state, created, parent, headline",
                        description="Complete versions, oldest first per kind. The headline is the first entry of "
                                    "a version's metrics.")
    p.add_argument("--kind", default=None, help="only this kind: reward, adapter or rollout (default: every kind)")
    add_registry_arg(p)
    p.add_argument("--json", action="store_true", help="print the manifests as one JSON array instead of a table")
    p.set_defaults(func=_list)

    p = rsub.add_parser("show", help="one version's manifest as JSON",
                        description="Prints the manifest: lineage, base models, training data, config, metrics, "
                                    "state and its history (who, why, when), file checksums.")
    p.add_argument("kind", help="artifact kind: reward, adapter or rollout")
    p.add_argument("version", help="version, e.g. v000003")
    add_registry_arg(p)
    p.set_defaults(func=_show)


def _list(args) -> int:
    from alignloop.registry import KINDS, Registry

    registry = Registry(args.registry)
    manifests = [m for kind in ([args.kind] if args.kind else KINDS) for m in registry.versions(kind)]
    if args.json:
        print_manifests_json(manifests)
        return 0
    if not manifests:
        print(f"no {args.kind + ' ' if args.kind else ''}versions in {registry.url}")
        return 0
    rows = [("KIND", "VERSION", "STATE", "CREATED (UTC)", "PARENT", "HEADLINE")]
    rows += [(m.kind, m.version, m.state, m.created_at.strftime("%Y-%m-%d %H:%M"), m.parent or "-",
              headline(m.metrics)) for m in manifests]
    print_table(rows)
    return 0


def print_manifests_json(manifests) -> None:
    print(json.dumps([json.loads(m.model_dump_json()) for m in manifests], indent=2))


def print_table(rows: list[tuple]) -> None:
    """Left-aligned columns, the first row the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _show(args) -> int:
    from alignloop.registry import Registry

    print(Registry(args.registry).get(args.kind, args.version).to_json(), end="")
    return 0


def headline(metrics: dict) -> str:
    """The first metric, by convention the one its publisher cares most about."""
    if not metrics:
        return "-"
    name, value = next(iter(metrics.items()))
    if isinstance(value, float):
        value = f"{value:.4g}"
    elif not isinstance(value, (int, str)) or isinstance(value, bool):
        value = json.dumps(value)
    text = f"{name}={value}"
    return text if len(text) <= 40 else text[:37] + "..."
