"""Who a request to /generate or /feedback speaks for: the one place that decides.

    identity = resolve_identity(config.identity_header, request.headers, request.cookies, body.user_id)

In order:
1. **A trusted header** (`ServingConfig.identity_header`, e.g. `X-Forwarded-User`), set by an authenticating
   proxy in front of the service. Only trusted when its name is configured, and then required: a request
   without it did not come through the proxy and gets 401 (`unauthenticated`). The body's `user_id` is ignored:
   the proxy, not the client, says who is asking.
2. **The body's `user_id`**, when no header is configured (a service without a proxy: the demo, the tests).
   It is a name the client chose, so it is not proof of anything; feedback tokens bound to it still stop one
   image from being voted under many names.
3. **The signed anonymous cookie** `/ui` sets (serving/arms.py), when there is no user id: a browser the
   service recognizes without knowing who it is.
4. Nobody: an API client without any of these.

The identity decides the arm (sticky per user or browser), the user hash in events (named users only), the
voter in the vote ledger, and `owner`, which feedback tokens carry: a vote must come from the identity the
image was generated for, so a token voted under six made-up user ids counts once, for its owner.
"""

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from alignloop.events import hash_user_id
from alignloop.serving.arms import ANON_COOKIE, anon_id_from_cookie

_USER_ID = re.compile(r"[\x21-\x7e]{1,128}")  # schemas.UserId: printable ASCII without spaces


class IdentityError(Exception):
    """The configured identity header is missing or unusable: 401 `unauthenticated`."""

    reason = "unauthenticated"


@dataclass(frozen=True)
class Identity:
    user_id: Optional[str] = None  # a named user (trusted header, or the body when no header is configured)
    anon_id: Optional[str] = None  # the anonymous cookie's id, when there is no user id; never logged or emitted

    @property
    def user_hash(self) -> Optional[str]:
        """What events and logs carry (hash_user_id); None for anonymous requests."""
        return hash_user_id(self.user_id) if self.user_id else None

    @property
    def routing_key(self) -> Optional[str]:
        """What the arm is sticky to; None: a random arm."""
        if self.user_id:
            return self.user_hash
        return f"anon:{self.anon_id}" if self.anon_id else None

    @property
    def owner(self) -> str:
        """What a feedback token is bound to: a keyed hash of the identity (another purpose than the event's user
        hash, so a token does not show it), or "" for nobody."""
        if self.user_id:
            return hash_user_id("token-owner/user/" + self.user_id)[:32]
        if self.anon_id:
            return hash_user_id("token-owner/anon/" + self.anon_id)[:32]
        return ""


def resolve_identity(identity_header: str, headers: Mapping[str, str], cookies: Mapping[str, str],
                     body_user_id: Optional[str]) -> Identity:
    """The request's identity (see the module's docstring), or IdentityError."""
    # 1. Behind an authenticating proxy: its header, and nothing else.
    if identity_header:
        value = headers.get(identity_header)
        if value is None:
            raise IdentityError(f"this service identifies users by the {identity_header} header, set by the "
                                "authenticating proxy in front of it; the request has none (send it through the proxy)")
        if not _USER_ID.fullmatch(value):
            raise IdentityError(f"the {identity_header} header must be 1..128 printable ASCII characters without "
                                "spaces")
        return Identity(user_id=value)
    # 2. The body's user id, then 3. the anonymous cookie.
    if body_user_id:
        return Identity(user_id=body_user_id)
    return Identity(anon_id=anon_id_from_cookie(cookies.get(ANON_COOKIE)))
