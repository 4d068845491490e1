"""Overload and abuse limits on /generate and /feedback, answered before a request body is read.

    app = AdmissionMiddleware(app, config)

1. **Rate limits per identity**: a token bucket per (route, identity) with a sustained rate and a burst
   (`ServingConfig.generate_per_min` / `generate_burst`, `feedback_per_min` / `feedback_burst`; 0 = off). The
   identity is the trusted header's user when `identity_header` is configured, else the client's address: a
   body user_id or an anonymous cookie costs nothing to change, so it cannot be what a limit counts. Over the
   limit: 429 with Retry-After (seconds until the bucket holds a request again).
2. **Requests in flight** per worker (`max_concurrency`): more get 503 with Retry-After: 1. (BentoML's own
   bound answers 429 without Retry-After and counts /ui and /admin too; this one replaces it.)

The batcher's queue bound (503, serving/batching.py) and the body-size bound (413, serving/http.py) are the
other limits. Buckets live in this worker's memory, at most `max_keys` of them (least recently used dropped
first), so a flood of new addresses cannot grow it without bound.
"""

import collections
import math
import threading
import time
from typing import Callable, Optional

from alignloop.serving.config import ServingConfig
from alignloop.serving.http import json_error


class RateLimiter:
    """Token buckets: `rate_per_s` sustained, `burst` at once, per key."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()  # (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0 when the request may go ahead (and is counted); else the seconds until it could."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate_per_s
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait


class AdmissionMiddleware:
    """ASGI middleware for the API routes: 429 over a rate limit, 503 over the in-flight bound."""

    def __init__(self, app, config: ServingConfig):
        self.app = app
        self.identity_header = config.identity_header.lower().encode()
        self.limiters: dict[str, Optional[RateLimiter]] = {
            "/generate": _limiter(config.generate_per_min, config.generate_burst),
            "/feedback": _limiter(config.feedback_per_min, config.feedback_burst),
        }
        self.max_in_flight = config.max_concurrency
        self.in_flight = 0  # requests of this worker's event loop between admission and their response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.limiters:
            return await self.app(scope, receive, send)
        # 1. The rate limit of who is asking
        limiter = self.limiters[scope["path"]]
        if limiter is not None:
            wait = limiter.acquire(self._key(scope))
            if wait:
                retry = max(1, math.ceil(wait))
                return await json_error(429, f"too many requests to {scope['path']}: at most {limiter.burst} at once "
                                             f"and {limiter.rate_per_s * 60:g} a minute; retry in {retry} s",
                                        reason="rate_limited", retry_after_s=retry)(scope, receive, send)
        # 2. The in-flight bound (one event loop per worker: no lock needed)
        if self.in_flight >= self.max_in_flight:
            return await json_error(503, f"the server is at capacity ({self.in_flight} requests in flight); retry "
                                         "in 1 s", reason="busy", retry_after_s=1)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _key(self, scope) -> str:
        if self.identity_header:
            for name, value in scope.get("headers") or []:
                if name.lower() == self.identity_header:
                    return "user:" + value.decode("latin-1")
        client = scope.get("client")
        return "addr:" + (client[0] if client else "?")


def _limiter(per_min: float, burst: int) -> Optional[RateLimiter]:
    return RateLimiter(per_min / 60, burst) if per_min > 0 else None
