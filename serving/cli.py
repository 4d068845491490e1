"""`alignloop serve` and `alignloop bench serving`."""

import os
import sys

SERVICE = "alignloop.serving.service:AlignLoop"


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve /generate, /feedback and the /ui page over HTTP (BentoML)",
        description="Serve best-k-of-n generation with signed feedback tokens; votes go to Kafka. "
                    "Open http://HOST:PORT/ui for the web page, /docs.json for the OpenAPI spec.")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 3000)), help="TCP port (default 3000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, each with its own models (default 1, or $ALIGNLOOP_SERVE_WORKERS)")
    p.add_argument("--generator", default=None, help="bundled name, diffusers folder or hub id (default shapes-sd-tiny)")
    p.add_argument("--clip", default=None, help="bundled name, open_clip folder or architecture (default shapes-clip-tiny)")
    p.add_argument("--clip-checkpoint", default=None, help="local checkpoint for an open_clip architecture name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--max-batch-images", type=int, default=None, help="images per diffusion pass (default 64)")
    p.add_argument("--no-batching", action="store_true", help="one request per diffusion pass (baseline)")
    p.add_argument("--identity-header", default=None,
                   help="trust this header as the user id (set by an authenticating proxy in front of the service; "
                        "then required, and the body's user_id is ignored). Default: none trusted. Rate limits and "
                        "queue bounds: ALIGNLOOP_SERVE_GENERATE_PER_MIN, _GENERATE_BURST, _FEEDBACK_PER_MIN, "
                        "_FEEDBACK_BURST (0 = no limit), _MAX_QUEUED_IMAGES, _MAX_CONCURRENCY")
    p.set_defaults(func=_serve)


def add_benchmarks(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "serving", help="HTTP vs in-process latency, batching on vs off, scoring share",
        description="At n=16, k=4: p50 latency of POST /generate over HTTP vs the same sampler in-process; "
                    "throughput of 8 concurrent clients with cross-request batching on vs off; share of "
                    "request time spent scoring. Prints one JSON object on its last line.")
    p.add_argument("--quick", action="store_true", help="fewer steps and requests (CI smoke run)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20, quick 4)")
    p.add_argument("--requests", type=int, default=None, help="latency samples per side (default 15, quick 4)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the throughput test")
    p.set_defaults(func=_bench)

    p = bench_subparsers.add_parser(
        "swap", help="adapter hot-swap: validation and switch time, p99 latency during swaps, memory over 50 swaps",
        description="In-process: 50 adapter swaps through the worker's slots (validation and switch time, resident "
                    "memory). Over HTTP with 8 clients: one arm, two arms (a 50% canary) and one arm while the live "
                    "adapter is swapped; failed requests and p99 latency during swaps vs without (the ratio). "
                    "Prints one JSON object on its last line.")
    p.add_argument("--quick", action="store_true", help="shorter phases, fewer steps (CI smoke run)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20, quick 4)")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    p.add_argument("--swaps", type=int, default=50, help="in-process swaps (default 50)")
    p.add_argument("--phase-s", type=float, default=None, help="seconds per HTTP phase (default 40, quick 12)")
    p.set_defaults(func=_bench_swap)


def serving_config_from_args(args):
    from alignloop.errors import UserFacingError
    from alignloop.serving.config import ServingConfig

    changes = {}
    for name in ("workers", "generator", "clip", "clip_checkpoint", "device", "max_batch_images", "identity_header"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if getattr(args, "no_batching", False):
        changes["cross_request_batching"] = False
    try:
        return ServingConfig.from_env(**changes)
    except ValueError as err:
        raise UserFacingError(str(err)) from None


def _serve(args) -> int:
    from alignloop.errors import UserFacingError
    from alignloop.models import ModelNotFoundError, resolve_generator

    config = serving_config_from_args(args)
    # Fail here, with the model error, rather than in every worker's startup log.
    try:
        resolve_generator(config.generator)
    except ModelNotFoundError as err:
        raise UserFacingError(str(err)) from None
    env = {**os.environ, **config.to_env(), "BENTOML_HOME": str(_bentoml_home(args.host, args.port))}
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(args.port), "--host", args.host]
    print(f"alignloop: serving on http://{args.host}:{args.port}/ui ({config.workers} worker(s), "
          f"generator {config.generator}, clip {config.clip})", file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


def _bentoml_home(host: str, port: int):
    """A BentoML home of this server's own. BentoML keeps its Prometheus multiprocess folder there and empties it at
    every start: with the shared ~/bentoml, each `bentoml serve` started on the machine wiped the metric files of the
    servers already running, whose /metrics then lost every count (seen as a swap test reading 0 switches)."""
    from alignloop.settings import home

    return home() / "serving" / "bentoml" / f"{host}-{port}"


def _bench_swap(args) -> int:
    from alignloop.serving.bench_swap import main

    return main(args)


def _bench(args) -> int:
    from alignloop.serving.bench import main

    return main(args)
