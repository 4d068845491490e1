"""Which A/B arm serves a user: one small function, so the rollout issue can replace the policy here.

Sticky by user: the bucket comes from the keyed user hash, so a user keeps their arm across requests and
workers without any shared state. Anonymous requests are spread at random (they cannot be sticky).
Until adapters exist there is one arm, "A", serving the base model ("base").
"""

import hashlib
import secrets
from dataclasses import dataclass
from typing import Optional, Sequence

from alignloop.serving.config import ArmSpec

_BUCKETS = 10_000


@dataclass(frozen=True)
class Arm:
    name: str  # "A", "B", ...
    adapter: str  # adapter version the arm serves; "base" = none


def assign_arm(user_hash: Optional[str], arms: Sequence[ArmSpec]) -> Arm:
    """The arm for this user (hash_user_id(user_id)), or a random one for anonymous requests."""
    if user_hash is None:
        bucket = secrets.randbelow(_BUCKETS)
    else:
        # Re-hash with a purpose string: the bucket must not correlate with other uses of the user hash.
        digest = hashlib.sha256(b"alignloop.arm." + user_hash.encode()).digest()
        bucket = int.from_bytes(digest[:8], "big") % _BUCKETS
    edge = 0.0
    for spec in arms:
        edge += spec.share * _BUCKETS
        if bucket < edge:
            return Arm(spec.name, spec.adapter)
    return Arm(arms[-1].name, arms[-1].adapter)  # float rounding at the top edge
