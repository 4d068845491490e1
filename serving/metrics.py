"""Prometheus metrics of the serving stage, exposed at GET /metrics with BentoML's own.

BentoML runs workers as processes and sets PROMETHEUS_MULTIPROC_DIR before importing the service, so these
plain prometheus_client metrics are aggregated over workers by its /metrics endpoint. No label carries a
user id, a prompt or any other unbounded value.
"""

from prometheus_client import Counter, Histogram

STAGES = ("queue", "sampling", "scoring", "storing", "producing", "total")

STAGE_SECONDS = Histogram(
    "alignloop_serving_stage_seconds", "Time of one /generate request spent per stage", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
REQUEST_N = Histogram("alignloop_serving_request_n", "Candidates sampled per request (n)",
                      buckets=(1, 2, 4, 8, 16, 32, 64))
REQUEST_K = Histogram("alignloop_serving_request_k", "Candidates returned per request (k)",
                      buckets=(1, 2, 4, 8, 16, 32, 64))
# CLIP similarity lives in [-1, 1], a trained head's sigmoid in (0, 1): buckets cover both.
REWARD = Histogram("alignloop_serving_reward", "Reward of returned (chosen) vs. discarded (rejected) candidates",
                   ["arm", "kind"], buckets=(-0.5, -0.25, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
# Adapter versions are bounded (a few per rollout), so they may be labels; the guardrail compares arms by them.
VOTES = Counter("alignloop_serving_votes_total", "Votes received, by arm and the adapter version that drew the image",
                ["arm", "adapter", "vote", "outcome"])
IMAGES = Counter("alignloop_serving_images_total", "Images drawn, by the adapter version that drew them", ["adapter"])
ADAPTER_LOADS = Counter("alignloop_serving_adapter_loads_total",
                        "Adapters loaded into a slot (ok) or refused by their checks (refused)", ["outcome"])
ROLLOUT_SWITCHES = Counter("alignloop_serving_rollout_switches_total",
                           "Routing-table switches to a new rollout (each worker counts its own)")
REWARD_MODEL_SWAPS = Counter("alignloop_serving_reward_model_swaps_total",
                             "Reward models swapped in (ok) or refused by their checks (refused)", ["outcome"])
EXPLORED = Counter("alignloop_serving_explored_total", "Requests whose last shown image was drawn below the top k")
FEEDBACK_REJECTED = Counter("alignloop_serving_feedback_rejected_total", "Feedback refused with 401, by reason",
                            ["reason"])
PASS_IMAGES = Histogram("alignloop_serving_pass_images", "Images per diffusion forward pass",
                        buckets=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128))
PASS_REQUESTS = Histogram("alignloop_serving_pass_requests", "Requests sharing one diffusion forward pass",
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16))
PASS_SECONDS = Histogram("alignloop_serving_pass_seconds", "Wall time of one diffusion forward pass",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))


def observe_pass(images: int, requests: int, seconds: float, adapter: str = "base") -> None:
    IMAGES.labels(adapter).inc(images)
    PASS_IMAGES.observe(images)
    PASS_REQUESTS.observe(requests)
    PASS_SECONDS.observe(seconds)


def observe_generation(arm: str, n: int, k: int, chosen: list[float], rejected: list[float], timings_ms: dict) -> None:
    REQUEST_N.observe(n)
    REQUEST_K.observe(k)
    for value in chosen:
        REWARD.labels(arm, "chosen").observe(value)
    for value in rejected:
        REWARD.labels(arm, "rejected").observe(value)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage).observe(timings_ms[f"{stage}_ms"] / 1000)
