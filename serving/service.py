"""The BentoML service: load the models once per worker, route HTTP to ServingCore. Kept thin on purpose.

    alignloop serve --port 3000 --workers 1         # or: bentoml serve alignloop.serving.service:AlignLoop

Routes: POST /generate, POST /feedback (handlers.py), GET /ui (http.py), /admin/... (admin.py: adapters and
the rollout, behind the admin token), and BentoML's own /metrics, /readyz (503 until this worker's models are
loaded and warm and it serves the registry's rollout), /livez, /docs.json (OpenAPI, with the API's error
responses: openapi.py). Each request is first admitted (limits.py: rate limits, in-flight bound), then its
identity is resolved (identity.py). The configuration comes from ALIGNLOOP_SERVE_* variables (config.py), which
`alignloop serve` sets.
"""

import logging
import os
import sqlite3

import bentoml
from starlette.responses import Response

from alignloop.serving.admin import admin_app
from alignloop.serving.batching import QueueFull
from alignloop.serving.config import ServingConfig
from alignloop.serving.handlers import ServingCore, TokenError, VoteNotQueued, log_event
from alignloop.serving.http import ApiErrorMiddleware, install_log_filters, json_error, ui_app
from alignloop.serving.identity import IdentityError, resolve_identity
from alignloop.serving.limits import AdmissionMiddleware
from alignloop.serving.openapi import OpenApiMiddleware
from alignloop.serving.schemas import FeedbackRequest, FeedbackResponse, GenerateRequest, GenerateResponse

log = logging.getLogger("alignloop.serving")
CONFIG = ServingConfig.from_env()
_WORKER: dict = {}  # this worker's RolloutFollower, for the admin routes (mounted apps have no service instance)


@bentoml.service(
    name="alignloop",
    workers=CONFIG.workers,
    threads=CONFIG.threads,  # sync API methods run on this many threads; they wait on the shared batcher
    traffic={"timeout": CONFIG.timeout_s},  # the in-flight bound is limits.AdmissionMiddleware's (503, Retry-After)
    resources={"gpu": 1} if CONFIG.device.startswith("cuda") else {},
)
@bentoml.asgi_app(ui_app(), path="/ui")
@bentoml.asgi_app(admin_app(lambda: _WORKER.get("rollout"), CONFIG.registry or None, CONFIG.max_adapter_upload_bytes),
                  path="/admin")
class AlignLoop:
    def __init__(self) -> None:
        self.core: ServingCore | None = None
        self.batcher = None
        self.producer = None
        self.follower = None
        self.rollout = None

    @bentoml.on_startup
    def load(self) -> None:
        """Per worker: models, the batcher that owns the pipeline, the Kafka producer, one warm-up pass."""
        import torch

        from alignloop.feedback.config import Topics, default_spool_dir
        from alignloop.feedback.image_store import ImageStore
        from alignloop.feedback.producer import EventProducer
        from alignloop.serving import metrics
        from alignloop.serving.adapter_slots import RolloutFollower
        from alignloop.serving.reward_slot import RegistryFollower
        from alignloop.serving.sampler import load_sampler
        from alignloop.serving.tokens import default_keys
        from alignloop.serving.votes import SqliteLedger
        from alignloop.settings import home

        install_log_filters()
        worker = bentoml.server_context.worker_index or 1
        torch.set_num_threads(CONFIG.torch_threads or max(1, (os.cpu_count() or 1) // CONFIG.workers))
        sampler, self.batcher = load_sampler(CONFIG, on_pass=metrics.observe_pass)
        self.follower = RegistryFollower(sampler.reward, CONFIG.registry or None, CONFIG.scorer_backend,
                                         CONFIG.reward_poll_s).start()  # the registry's live reward model, if any
        # The rollout's adapters, loaded and checked before this worker says it is ready.
        self.rollout = RolloutFollower(self.batcher.slots, CONFIG.registry or None, CONFIG.arms,
                                       CONFIG.rollout_poll_s).start()
        _WORKER["rollout"] = self.rollout
        sampler.sample("warm-up", n=1, k=1, steps=1, guidance=CONFIG.default_guidance, seed=0)
        self.producer = EventProducer(bootstrap=CONFIG.kafka_bootstrap or None,
                                      spool_dir=default_spool_dir().parent / f"serving-worker-{worker}",
                                      topics=Topics().prefixed(CONFIG.topic_prefix))
        ledger = SqliteLedger(CONFIG.vote_ledger or home() / "serving" / "votes.sqlite", CONFIG.token_ttl_s)
        self.core = ServingCore(sampler, self.producer, ImageStore(CONFIG.image_store or None), ledger,
                                default_keys(), CONFIG, routing=lambda: self.rollout.table)
        log_event("worker_ready", worker=worker, generator=CONFIG.generator, clip=CONFIG.clip,
                  reward_model=sampler.reward.current()[1], rollout=self.rollout.table.rollout_id, backend=sampler.reward.current()[0].choice.reason,
                  torch_threads=torch.get_num_threads(), max_batch_images=CONFIG.max_batch_images,
                  cross_request_batching=CONFIG.cross_request_batching)

    @bentoml.on_shutdown
    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
        if self.follower is not None:
            self.follower.close()
        if self.batcher is not None:
            self.batcher.close()
        if self.producer is not None:
            self.producer.close(timeout_s=CONFIG.flush_on_shutdown_s)  # what Kafka did not ack is spooled

    def __is_ready__(self) -> bool:
        return self.core is not None and self.batcher.alive and self.rollout.settled

    @bentoml.api(route="/generate")
    def generate(self, request: GenerateRequest, /, ctx: bentoml.Context) -> GenerateResponse:
        """Sample n images for the prompt, rank them by reward, return the best k with feedback tokens."""
        try:
            identity = resolve_identity(CONFIG.identity_header, ctx.request.headers, ctx.request.cookies,
                                        request.user_id)
            return self.core.generate(request, identity)
        except IdentityError as err:
            return _error(ctx, 401, str(err), reason=err.reason)
        except QueueFull as err:
            return _error(ctx, 503, str(err), reason="queue_full", retry_after_s=err.retry_after_s)
        except Exception:  # a bug or a failing model: log it with context, answer without internals
            log.exception("generate failed")
            return _error(ctx, 500, "generation failed; the error is logged on the server")

    @bentoml.api(route="/feedback")
    def feedback(self, request: FeedbackRequest, /, ctx: bentoml.Context) -> FeedbackResponse:
        """Record a thumbs-up or thumbs-down for one returned image (202; a repeated vote is idempotent)."""
        try:
            identity = resolve_identity(CONFIG.identity_header, ctx.request.headers, ctx.request.cookies,
                                        request.user_id)
            response = self.core.feedback(request, identity)
        except (IdentityError, TokenError) as err:
            return _error(ctx, getattr(err, "status", 401), str(err), reason=err.reason)
        except VoteNotQueued as err:
            return _error(ctx, 503, str(err), reason="vote_not_queued", retry_after_s=1)
        except sqlite3.OperationalError:  # the vote ledger stayed locked past its timeout: other workers' writes
            log.warning("vote ledger busy; answered 503")
            return _error(ctx, 503, "the vote was not recorded: the server is busy; retry in 1 s", reason="ledger_busy",
                          retry_after_s=1)
        ctx.response.status_code = 202
        return response


# Outermost first: the OpenAPI document, then admission (no body read yet), then 415 / 413 and readable 4xx.
AlignLoop.add_asgi_middleware(OpenApiMiddleware)
AlignLoop.add_asgi_middleware(AdmissionMiddleware, config=CONFIG)
AlignLoop.add_asgi_middleware(ApiErrorMiddleware)


def _error(ctx: bentoml.Context, status: int, message: str, retry_after_s: int | None = None, **extra) -> Response:
    # BentoML copies ctx.response.status_code onto any response of a method that takes ctx.
    ctx.response.status_code = status
    return json_error(status, message, retry_after_s=retry_after_s, **extra)
