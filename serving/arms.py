"""Which A/B arm serves a user: sticky per user within a rollout, reshuffled by each new rollout.

    arm = assign_arm(user_hash, table.arms, table.rollout_id)

The bucket is a hash of (rollout id, user key), so a user keeps their arm across requests and workers without
shared state, and each new rollout draws a new B population: otherwise the same users would be the guinea
pigs of every canary, and arm B's thumbs would measure those users as much as the adapter.

Anonymous browser users are sticky too: GET /ui sets a signed cookie (`alignloop_anon`, HttpOnly,
SameSite=Lax) carrying a random anonymous id; /generate routes by it when the body has no user_id. The id is
used for routing only: events of anonymous requests still carry no user hash. Requests with neither are
spread at random.
"""

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

from alignloop.secrets import load_secret
from alignloop.serving.config import ArmSpec

_BUCKETS = 10_000
ANON_COOKIE = "alignloop_anon"
ANON_COOKIE_MAX_AGE_S = 365 * 24 * 3600
_COOKIE_DOMAIN = b"alignloop.anon-cookie.v1."  # binds the MAC to this use of the key
_COOKIE_SHAPE = re.compile(r"[0-9a-f]{32}\.[0-9a-f]{64}")  # what mint_anon_cookie makes


@dataclass(frozen=True)
class Arm:
    name: str  # "A", "B", ...
    adapter: str  # adapter version the arm serves; "base" = none


def assign_arm(user_key: Optional[str], arms: Sequence[ArmSpec], rollout_id: str = "") -> Arm:
    """The arm for this user key (hash_user_id(user_id), or an anonymous cookie's id) in this rollout, or a random
    one when there is no key."""
    if user_key is None:
        bucket = secrets.randbelow(_BUCKETS)
    else:
        # Re-hash with a purpose string and the rollout id: the bucket must not correlate with other uses of the
        # user hash, nor with the user's bucket in earlier rollouts.
        digest = hashlib.sha256(b"alignloop.arm." + rollout_id.encode() + b"." + user_key.encode()).digest()
        bucket = int.from_bytes(digest[:8], "big") % _BUCKETS
    edge = 0.0
    for spec in arms:
        edge += spec.share * _BUCKETS
        if bucket < edge:
            return Arm(spec.name, spec.adapter)
    return Arm(arms[-1].name, arms[-1].adapter)  # float rounding at the top edge


# -- the anonymous cookie ----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def cookie_key() -> bytes:
    return load_secret("anon_cookie_key")


def mint_anon_cookie(key: Optional[bytes] = None) -> str:
    """A new signed cookie value: `<anonymous id>.<hmac>`."""
    anon_id = secrets.token_hex(16)
    return f"{anon_id}.{_sign(key or cookie_key(), anon_id)}"


def anon_id_from_cookie(value: Optional[str], key: Optional[bytes] = None) -> Optional[str]:
    """The anonymous id of a cookie we signed, else None (absent, altered or forged: route at random).

    The shape is checked first: a cookie is whatever the client sent (any characters, after the browser's and
    the server's quoting), and `hmac.compare_digest` raises on non-ASCII strings."""
    if not isinstance(value, str) or not _COOKIE_SHAPE.fullmatch(value):
        return None
    anon_id, signature = value.split(".")
    if not hmac.compare_digest(signature.encode(), _sign(key or cookie_key(), anon_id).encode()):
        return None
    return anon_id


def _sign(key: bytes, anon_id: str) -> str:
    return hmac.new(key, _COOKIE_DOMAIN + anon_id.encode(), hashlib.sha256).hexdigest()
