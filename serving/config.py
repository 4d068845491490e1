"""Typed configuration of the serving stage. Every field carries its unit.

BentoML starts each worker as its own process and imports `alignloop.serving.service` there, so the
configuration travels through the environment: `alignloop serve` writes `ALIGNLOOP_SERVE_<FIELD>` variables,
each worker reads them back with `ServingConfig.from_env()`. Unset variables keep the defaults below.
"""

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field, fields

ENV_PREFIX = "ALIGNLOOP_SERVE_"


@dataclass(frozen=True)
class ArmSpec:
    """One A/B arm: which adapter it serves and the share of users routed to it (0..1)."""

    name: str
    adapter: str
    share: float


@dataclass(frozen=True)
class ServingConfig:
    # -- models ---------------------------------------------------------------------------------------------
    generator: str = "shapes-sd-tiny"  # bundled name, local diffusers folder, or hub id (online only)
    clip: str = "shapes-clip-tiny"  # bundled name, local open_clip folder, or architecture name + clip_checkpoint
    clip_checkpoint: str = ""  # local checkpoint file for an open_clip architecture name ("" = none)
    device: str = ""  # "cpu", "cuda", "cuda:1"; "" = CUDA when available, else CPU
    dtype: str = ""  # "fp32", "fp16", "bf16"; "" = fp16 on CUDA, fp32 on CPU
    scorer_backend: str = "auto"  # alignloop.kernels dispatch: auto / torch / onnxruntime / triton
    # Where the trainer publishes reward models; each worker ranks by the live one (CLIP score until there is
    # one) and polls for a new one every reward_poll_s seconds. "" = alignloop.registry.default_registry_url().
    registry: str = ""
    reward_poll_s: float = 30.0

    # -- process layout -------------------------------------------------------------------------------------
    workers: int = 1  # BentoML worker processes; each loads its own pipeline and CLIP (memory x workers)
    threads: int = 16  # request threads per worker; they wait on the micro-batcher, so more than cores is fine
    torch_threads: int = 0  # intra-op threads per worker; 0 = cores // workers (no oversubscription)
    timeout_s: float = 300.0  # per-request limit enforced by BentoML (seconds)
    # /generate and /feedback requests in flight per worker; more get 503 with Retry-After (serving/limits.py)
    max_concurrency: int = 64

    # -- sampling -------------------------------------------------------------------------------------------
    default_steps: int = 20  # denoising steps when the request leaves `steps` out
    default_guidance: float = 7.5  # classifier-free guidance scale when the request leaves it out
    # Images per UNet forward pass. Concurrent requests with the same (steps, guidance) share passes up to
    # this many images; a request with more candidates is split over several passes. 64 fits 32 px easily;
    # lower it for 512 px models on small GPUs.
    max_batch_images: int = 64
    # How long the batcher waits for more requests before starting a pass when the pass is not full (ms).
    # Requests arriving while a pass runs join the next one anyway; this only groups simultaneous arrivals.
    batch_wait_ms: float = 5.0
    # Cross-request batching on/off. Off: each pass holds images of one request only (the benchmark baseline).
    cross_request_batching: bool = True
    # Chance per request that the last of the k images shown is drawn from the candidates ranked k-th and below
    # instead of the k-th best, so that votes also reach what the reward ranks low (selection bias).
    explore_probability: float = 0.25
    # Candidates waiting for the batcher (submitted, not yet in a pass) per worker; a /generate that would push
    # the queue past it gets 503 with Retry-After instead of waiting ever longer. A request finding the queue
    # empty is always taken, so any n up to 64 can be served.
    max_queued_images: int = 512

    # -- identity and abuse limits (serving/identity.py, serving/limits.py) ---------------------------------------
    # Header naming the user, set by an authenticating proxy in front of the service (e.g. X-Forwarded-User).
    # "" = no proxy: the body's user_id (or the /ui cookie) is the identity. Set: the header is the identity and
    # required (401 without it), the body's user_id is ignored.
    identity_header: str = ""
    # Token buckets per identity (the trusted header's user, else the client's address) and per worker: a
    # sustained rate (requests per minute; 0 = no limit) and a burst (requests allowed at once). Over it: 429
    # with Retry-After. With W workers a client can get up to W times these.
    generate_per_min: float = 30.0
    generate_burst: int = 10
    feedback_per_min: float = 300.0
    feedback_burst: int = 60

    # -- feedback -------------------------------------------------------------------------------------------
    token_ttl_s: int = 7 * 24 * 3600  # feedback tokens expire this long after the images were returned (s)
    image_store: str = ""  # fsspec URL of the image store; "" = <ALIGNLOOP_HOME>/images
    kafka_bootstrap: str = ""  # "" = alignloop.settings.kafka_bootstrap() ($ALIGNLOOP_KAFKA)
    topic_prefix: str = ""  # prepended to both topic names (tests and benchmarks use their own topics)
    vote_ledger: str = ""  # SQLite file that makes votes idempotent across workers; "" = <ALIGNLOOP_HOME>/serving/votes.sqlite
    flush_on_shutdown_s: float = 5.0  # on worker shutdown, wait this long for Kafka acks before spooling (s)

    # -- adapters and A/B arms -------------------------------------------------------------------------------
    # The arms served while the registry holds no rollout; once one is published every worker follows it.
    arms: tuple = field(default=(ArmSpec("A", "base", 1.0),))
    rollout_poll_s: float = 0.5  # how often each worker reads the registry's current rollout (seconds)
    max_adapters: int = 3  # LoRA adapters resident per worker: live, canary, the previous live (instant rollback)
    max_adapter_rank: int = 16  # adapters of a higher LoRA rank are refused; slots are padded to it
    # Largest adapter file POST /admin/adapters accepts (bytes); SD-1.5 LoRAs of rank 64 are ~100 MB.
    max_adapter_upload_bytes: int = 512 * 1024 * 1024

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_queued_images < 1:
            raise ValueError(f"max_queued_images must be >= 1, got {self.max_queued_images}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        for name in ("generate", "feedback"):
            if getattr(self, f"{name}_per_min") < 0 or getattr(self, f"{name}_burst") < 1:
                raise ValueError(f"{name}_per_min must be >= 0 (0 = no limit) and {name}_burst >= 1, got "
                                 f"{getattr(self, f'{name}_per_min')} and {getattr(self, f'{name}_burst')}")
        if self.identity_header and not re.fullmatch(r"[A-Za-z0-9-]+", self.identity_header):
            raise ValueError(f"identity_header must be a header name (letters, digits, '-'), got {self.identity_header!r}")
        if self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be >= 1, got {self.max_batch_images}")
        if not 1 <= self.default_steps <= 150:
            raise ValueError(f"default_steps must be in 1..150, got {self.default_steps}")
        if not 0 <= self.default_guidance <= 30:
            raise ValueError(f"default_guidance must be in 0..30, got {self.default_guidance}")
        if not 0 <= self.explore_probability <= 1:
            raise ValueError(f"explore_probability must be in [0, 1], got {self.explore_probability}")
        if self.reward_poll_s <= 0:
            raise ValueError(f"reward_poll_s must be > 0 seconds, got {self.reward_poll_s}")
        if self.token_ttl_s < 1:
            raise ValueError(f"token_ttl_s must be >= 1 second, got {self.token_ttl_s}")
        if self.rollout_poll_s <= 0:
            raise ValueError(f"rollout_poll_s must be > 0 seconds, got {self.rollout_poll_s}")
        if not 1 <= self.max_adapters <= 100:
            raise ValueError(f"max_adapters must be in 1..100, got {self.max_adapters}")
        if self.max_adapter_rank < 1:
            raise ValueError(f"max_adapter_rank must be >= 1, got {self.max_adapter_rank}")
        if not self.arms or abs(sum(a.share for a in self.arms) - 1.0) > 1e-6:
            raise ValueError(f"arm shares must sum to 1, got {[(a.name, a.share) for a in self.arms]}")

    # -- environment round trip -----------------------------------------------------------------------------

    def to_env(self) -> dict:
        """The ALIGNLOOP_SERVE_* variables that make `from_env()` in a worker return this config."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "arms":  # a list of objects: JSON
                env[ENV_PREFIX + "ARMS"] = json.dumps([dataclasses.asdict(a) for a in value])
                continue
            env[ENV_PREFIX + f.name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "ServingConfig":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.name == "arms":
                values["arms"] = _arms_from_json(raw)
                continue
            kind = type(f.default)
            try:
                if kind is bool:
                    values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be a {kind.__name__}, got {raw!r}") from None
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> "ServingConfig":
        return dataclasses.replace(self, **changes)


def _arms_from_json(raw: str) -> tuple:
    """ALIGNLOOP_SERVE_ARMS: a JSON list of {"name", "adapter", "share"}."""
    try:
        arms = tuple(ArmSpec(str(a["name"]), str(a["adapter"]), float(a["share"])) for a in json.loads(raw))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{ENV_PREFIX}ARMS must be a JSON list of {{\"name\", \"adapter\", \"share\"}} objects, "
                         f"got {raw!r} ({err})") from None
    return arms
