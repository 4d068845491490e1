"""What POST /generate and POST /feedback do, free of HTTP: service.py routes to these two methods.

`ServingCore` depends on small interfaces only (a sampler, an event sink, an image store, a vote ledger and
the token keys), so unit tests run it with fakes; the integration tests run it behind the real server. Who is
asking (an `Identity`) is decided before, in serving/identity.py; without one, the body's user_id is used.
"""

import base64
import hmac
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from alignloop.events import FeedbackEvent, GeneratedImage, GenerationEvent, GenerationParams
from alignloop.feedback.producer import EventSink
from alignloop.serving import metrics
from alignloop.serving.adapter_slots import CONFIG_ROLLOUT, RoutingTable
from alignloop.serving.arms import assign_arm
from alignloop.serving.config import ServingConfig
from alignloop.serving.identity import Identity
from alignloop.serving.sampler import BestOfN
from alignloop.serving.schemas import (FeedbackRequest, FeedbackResponse, GenerateRequest, GenerateResponse,
                                       ImageResult, Timings)
from alignloop.serving.tokens import Keyring, TokenClaims, TokenError, mint, prompt_hash, verify
from alignloop.serving.votes import ANONYMOUS, VoteLedger

log = logging.getLogger("alignloop.serving")


class VoteNotQueued(Exception):
    """The producer dropped a new vote's event (its inbox is full): 503, the client retries."""


class SamplerLike(Protocol):
    def sample(self, prompt: str, n: int, k: int, steps: int, guidance: float, seed: Optional[int],
               adapter: str = "base") -> BestOfN: ...


class ImageStoreLike(Protocol):
    def put(self, image_id: str, png: bytes) -> str: ...

    def uri(self, image_id: str) -> str: ...


@dataclass
class ServingCore:
    sampler: SamplerLike
    sink: EventSink
    store: ImageStoreLike
    ledger: VoteLedger
    token_key: Keyring | bytes  # the feedback-token keys (tokens.default_keys()); bytes: one key
    config: ServingConfig
    clock: Callable[[], float] = time.time  # token expiry; tests move it
    # The routing table now (serving.adapter_slots.RolloutFollower.table); None: the config's arms.
    routing: Optional[Callable[[], RoutingTable]] = None

    def generate(self, req: GenerateRequest, identity: Optional[Identity] = None) -> GenerateResponse:
        """`identity`: who is asking (serving/identity.py); None = the body's user_id."""
        started = time.monotonic()
        identity = identity or Identity(user_id=req.user_id)
        # 1. Route: the user's arm in the current rollout decides the adapter (sticky by hashed user id, or by
        #    the anonymous cookie); the table is read once, so one rollout routes the whole request.
        user_hash = identity.user_hash
        table = self.routing() if self.routing else RoutingTable(CONFIG_ROLLOUT, tuple(self.config.arms))
        arm = assign_arm(identity.routing_key, table.arms, table.rollout_id)
        steps = req.steps if req.steps is not None else self.config.default_steps
        guidance = req.guidance if req.guidance is not None else self.config.default_guidance
        request_id = f"req-{uuid.uuid4().hex}"

        # 2. Sample n, score, keep the best k
        best = self.sampler.sample(req.prompt, req.n, req.k, steps, guidance, req.seed, adapter=arm.adapter)

        # 3. Store the k images
        t_store = time.monotonic()
        image_ids = [f"img-{uuid.uuid4().hex}" for _ in range(req.k)]
        pngs = [encode_png(image) for image in best.images]
        uris = [self.store.put(image_id, png) for image_id, png in zip(image_ids, pngs)]

        # 4. Emit the generation event (non-blocking; the producer spools if Kafka is down)
        t_produce = time.monotonic()
        self.sink.emit(GenerationEvent(
            request_id=request_id, user_hash=user_hash, prompt=req.prompt, arm=arm.name,
            adapter_version=best.adapter,
            params=GenerationParams(n=req.n, k=req.k, steps=steps, guidance=float(guidance), seed=best.seed),
            images=[GeneratedImage(image_id=i, uri=u, rank=r + 1, reward=best.rewards[r],
                                   candidate_index=best.indices[r], seed=best.seeds[r],
                                   shown_probability=best.shown_probabilities[r])
                    for r, (i, u) in enumerate(zip(image_ids, uris))],
            candidate_rewards=best.candidate_rewards, reward_model=best.reward_model,
        ))
        t_done = time.monotonic()

        # 5. Sign one feedback token per image, bound to who asked, and answer
        expires_at = int(self.clock()) + self.config.token_ttl_s
        digest = prompt_hash(req.prompt)
        images = [
            ImageResult(image_id=image_id, image=base64.b64encode(png).decode(), reward=best.rewards[r], rank=r + 1,
                        candidate_index=best.indices[r], seed=best.seeds[r], feedback_token=mint(self.token_key, TokenClaims(image_id, request_id, digest, arm.name,
                                                                        best.adapter, expires_at, identity.owner)))
            for r, (image_id, png) in enumerate(zip(image_ids, pngs))
        ]
        timings = Timings(queue_ms=_ms(best.queue_s), sampling_ms=_ms(best.sampling_s),
                          scoring_ms=_ms(best.scoring_s), storing_ms=_ms(t_produce - t_store),
                          producing_ms=_ms(t_done - t_produce), total_ms=_ms(time.monotonic() - started))
        chosen = set(best.indices)
        if best.explored:
            metrics.EXPLORED.inc()
        metrics.observe_generation(arm.name, req.n, req.k, best.rewards,
                                   [r for i, r in enumerate(best.candidate_rewards) if i not in chosen],
                                   timings.model_dump())
        log_event("generate", request_id=request_id, user=_short(user_hash), arm=arm.name, adapter=best.adapter,
                  rollout=table.rollout_id,
                  n=req.n, k=req.k, steps=steps, guidance=guidance, seed=best.seed, reward_model=best.reward_model,
                  explored=best.explored,
                  top_reward=round(best.rewards[0], 4), **{k: round(v, 1) for k, v in timings.model_dump().items()})
        return GenerateResponse(request_id=request_id, arm=arm.name, adapter=best.adapter, rollout=table.rollout_id,
                                reward_model=best.reward_model, seed=best.seed, n=req.n,
                                k=req.k, steps=steps, guidance=float(guidance), images=images, timings=timings)

    def feedback(self, req: FeedbackRequest, identity: Optional[Identity] = None) -> FeedbackResponse:
        """Raises TokenError: 401 for a token that is malformed, not ours, altered or expired; 403 for a token
        issued to another identity. `identity`: who is voting; None = the body's user_id."""
        identity = identity or Identity(user_id=req.user_id)
        # 1. Verify the token: key and signature first, then expiry, then that it was issued to this voter
        try:
            claims = verify(self.token_key, req.feedback_token, now=self.clock())
            if not hmac.compare_digest(claims.owner, identity.owner):
                raise TokenError("other_identity", "feedback_token was issued to another identity: vote as the "
                                                   "user (or from the browser) that generated the image")
        except TokenError as err:
            metrics.FEEDBACK_REJECTED.labels(err.reason).inc()
            log_event("feedback_rejected", reason=err.reason)
            raise

        # 2. Dedupe per (image, user): the same vote again returns the first event's id. The voter must be the
        #    token's owner, so an image has one vote per identity it was generated for, whatever else is claimed.
        user_hash = identity.user_hash
        event = FeedbackEvent(request_id=claims.request_id, image_id=claims.image_id, vote=req.vote,
                              user_hash=user_hash, arm=claims.arm, adapter_version=claims.adapter,
                              image_uri=self.store.uri(claims.image_id))
        event_id, is_new = self.ledger.record(claims.image_id, user_hash or ANONYMOUS, req.vote, str(event.event_id))

        # 3. Emit a new vote (a changed vote is new too). One the producer dropped is undone in the ledger and
        #    answered 503, so that the client's retry is recorded and emitted instead of a "duplicate" of nothing.
        if is_new and not self.sink.emit(event):
            self.ledger.forget(claims.image_id, user_hash or ANONYMOUS, event_id)
            metrics.VOTES.labels(claims.arm, claims.adapter, req.vote, "not_queued").inc()
            raise VoteNotQueued("the vote was not recorded: the event stream is backed up; retry in 1 s")
        outcome = "accepted" if is_new else "duplicate"
        metrics.VOTES.labels(claims.arm, claims.adapter, req.vote, outcome).inc()
        log_event("feedback", request_id=claims.request_id, image_id=claims.image_id, user=_short(user_hash),
                  arm=claims.arm, adapter=claims.adapter, vote=req.vote, outcome=outcome, event_id=event_id)
        return FeedbackResponse(event_id=event_id, status=outcome, image_id=claims.image_id, vote=req.vote)


def encode_png(image: torch.Tensor) -> bytes:
    """A [3, H, W] float image in [0, 1] as PNG bytes."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def log_event(event: str, **fields) -> None:
    """One JSON object per line: easy to grep by request_id, and never a raw user id (only hash prefixes)."""
    log.info(json.dumps({"event": event, **fields}, default=str))


def _short(user_hash: Optional[str]) -> Optional[str]:
    return user_hash[:12] if user_hash else None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


__all__ = ["ServingCore", "TokenError", "encode_png"]
