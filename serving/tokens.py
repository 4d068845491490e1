"""Signed feedback tokens: what lets POST /feedback trust a vote without a database lookup.

    token = mint(key, TokenClaims(image_id, request_id, prompt_sha, arm, adapter, expires_at))
    claims = verify(key, token)         # raises TokenError("malformed" | "bad_signature" | "expired")

Format: `v1.<payload>.<signature>`, both parts base64url without padding. The payload is compact JSON of the
claims; the signature is HMAC-SHA256 over `alignloop.feedback.v1.` + the payload's base64 text, keyed with
the `feedback_token_key` secret (alignloop.secrets: $ALIGNLOOP_FEEDBACK_TOKEN_KEY or a 0600 file). The
signature is checked, in constant time, before a byte of the payload is parsed; the expiry after that.
The token is not encrypted: it holds ids and a hash of the prompt, nothing about the user.
"""

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

from alignloop.secrets import load_secret

VERSION = "v1"
_DOMAIN = b"alignloop.feedback.v1."  # binds the MAC to this use of the key
MAX_TOKEN_CHARS = 2048  # what FeedbackRequest accepts; minted tokens are ~300 characters
_FIELDS = {"image_id": str, "request_id": str, "prompt_sha": str, "arm": str, "adapter": str, "expires_at": int}


class TokenError(Exception):
    """A token that must not be accepted. `reason` is one of malformed, bad_signature, expired."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TokenClaims:
    image_id: str
    request_id: str
    prompt_sha: str  # prompt_hash(prompt): ties the vote to what was asked without carrying the prompt
    arm: str
    adapter: str
    expires_at: int  # unix seconds


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


@lru_cache(maxsize=1)
def default_key() -> bytes:
    return load_secret("feedback_token_key")


def mint(key: bytes, claims: TokenClaims) -> str:
    payload = _b64encode(json.dumps(asdict(claims), separators=(",", ":"), sort_keys=True).encode())
    return f"{VERSION}.{payload}.{_b64encode(_sign(key, payload))}"


def verify(key: bytes, token: str, now: float | None = None) -> TokenClaims:
    """The token's claims, or TokenError. Checks, in order: shape, signature (constant time), expiry."""
    # 1. Shape: three parts, known version, base64url signature of the right length.
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("malformed", f"feedback_token must be a string of at most {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION or not parts[1]:
        raise TokenError("malformed", "feedback_token is malformed: expected 'v1.<payload>.<signature>' "
                                      "as returned by POST /generate")
    _, payload, signature = parts
    try:
        given = _b64decode(signature)
    except ValueError:
        raise TokenError("malformed", "feedback_token is malformed: the signature is not base64url") from None
    if len(given) != hashlib.sha256().digest_size:
        raise TokenError("malformed", "feedback_token is malformed: the signature has the wrong length")
    # 2. Signature, before the payload is trusted or even parsed.
    if not hmac.compare_digest(given, _sign(key, payload)):
        raise TokenError("bad_signature", "feedback_token signature does not match: the token was altered or "
                                          "not issued by this service")
    # 3. Claims: signed by us, so a failure here is a bug or a key shared with something else.
    try:
        raw = json.loads(_b64decode(payload))
        if set(raw) != set(_FIELDS) or not all(type(raw[f]) is t for f, t in _FIELDS.items()):
            raise ValueError(f"claims {sorted(raw)}")
        claims = TokenClaims(**raw)
    except (ValueError, TypeError) as err:
        raise TokenError("malformed", f"feedback_token payload is malformed ({err})") from None
    # 4. Expiry.
    now = time.time() if now is None else now
    if now >= claims.expires_at:
        raise TokenError("expired", f"feedback_token expired {int(now - claims.expires_at)} s ago; "
                                    "votes are accepted for a limited time after generation")
    return claims


def _sign(key: bytes, payload_b64: str) -> bytes:
    return hmac.new(key, _DOMAIN + payload_b64.encode(), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as err:
        raise ValueError(str(err)) from None
