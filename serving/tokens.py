"""Signed feedback tokens: what lets POST /feedback trust a vote without a database lookup.

    keys = default_keys()                # Keyring: the current key, and the previous one during a rotation
    token = mint(keys, TokenClaims(image_id, request_id, prompt_sha, arm, adapter, expires_at, owner))
    claims = verify(keys, token)         # raises TokenError("malformed" | "unknown_key" | "bad_signature" | "expired")

Format: `v2.<key id>.<payload>.<signature>`, base64url without padding. The payload is compact JSON of the
claims; the signature is HMAC-SHA256 over `alignloop.feedback.v2.` + key id + `.` + the payload's base64 text,
keyed with the `feedback_token_key` secret (alignloop.secrets: $ALIGNLOOP_FEEDBACK_TOKEN_KEY or a 0600 file).
The key id (8 hex digits of a hash of the key) says which key signed the token, so keys can rotate: put the old
key into `feedback_token_key_previous` and a new one into `feedback_token_key`; new tokens are signed with the
new key, tokens of the old one stay valid until they expire. Remove the previous key after `token_ttl_s`: by
then every token it signed has expired (the expiry is inside the signed payload). A token of any other key id
(forged, or of a key retired before) is refused as `unknown_key`. The signature is checked, in constant time,
before a byte of the payload is parsed; the expiry after that.

`owner` binds the token to the identity that generated the image (serving/identity.py: a keyed hash, never the
id itself); the handler refuses a vote from any other identity (403 `other_identity`). The token is not
encrypted: it holds ids, a hash of the prompt and that owner hash.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

from alignloop.secrets import load_secret, optional_secret

VERSION = "v2"
_DOMAIN = b"alignloop.feedback.v2."  # binds the MAC to this use of the key
MAX_TOKEN_CHARS = 2048  # what FeedbackRequest accepts; minted tokens are ~350 characters
_FIELDS = {"image_id": str, "request_id": str, "prompt_sha": str, "arm": str, "adapter": str, "expires_at": int,
           "owner": str}
_KEY_ID = re.compile(r"[0-9a-f]{8}")


class TokenError(Exception):
    """A token that must not be accepted. `reason`: malformed, unknown_key, bad_signature, expired (401: the token
    itself is bad) or other_identity (403: a good token, voted by someone it was not issued to)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    @property
    def status(self) -> int:
        return 403 if self.reason == "other_identity" else 401


@dataclass(frozen=True)
class TokenClaims:
    image_id: str
    request_id: str
    prompt_sha: str  # prompt_hash(prompt): ties the vote to what was asked without carrying the prompt
    arm: str
    adapter: str
    expires_at: int  # unix seconds
    owner: str = ""  # Identity.owner of who generated the image (serving/identity.py); "" = nobody identified


@dataclass(frozen=True)
class Keyring:
    """The key new tokens are signed with, and the keys still accepted (the previous one during a rotation)."""

    current: bytes
    previous: tuple = ()

    def by_id(self) -> dict:
        return {key_id(k): k for k in (*self.previous, self.current)}


def key_id(key: bytes) -> str:
    """8 hex digits naming a key; a hash, so the token shows which key signed it without showing the key."""
    return hashlib.sha256(b"alignloop.feedback-key-id." + key).hexdigest()[:8]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


@lru_cache(maxsize=1)
def default_keys() -> Keyring:
    previous = optional_secret("feedback_token_key_previous")
    return Keyring(load_secret("feedback_token_key"), (previous,) if previous else ())


def mint(keys: Keyring | bytes, claims: TokenClaims) -> str:
    key = _keyring(keys).current
    kid = key_id(key)
    payload = _b64encode(json.dumps(asdict(claims), separators=(",", ":"), sort_keys=True).encode())
    return f"{VERSION}.{kid}.{payload}.{_b64encode(_sign(key, kid, payload))}"


def verify(keys: Keyring | bytes, token: str, now: float | None = None) -> TokenClaims:
    """The token's claims, or TokenError. Checks, in order: shape, key id, signature (constant time), expiry."""
    # 1. Shape: four parts, known version, base64url signature of the right length.
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("malformed", f"feedback_token must be a string of at most {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION or not _KEY_ID.fullmatch(parts[1]) or not parts[2]:
        raise TokenError("malformed", "feedback_token is malformed: expected 'v2.<key id>.<payload>.<signature>' "
                                      "as returned by POST /generate")
    _, kid, payload, signature = parts
    try:
        given = _b64decode(signature)
    except ValueError:
        raise TokenError("malformed", "feedback_token is malformed: the signature is not base64url") from None
    if len(given) != hashlib.sha256().digest_size:
        raise TokenError("malformed", "feedback_token is malformed: the signature has the wrong length")
    # 2. The key that signed it: the current one or one still accepted after a rotation.
    key = _keyring(keys).by_id().get(kid)
    if key is None:
        raise TokenError("unknown_key", "feedback_token was not signed by a key this service accepts: it is forged, "
                                        "or its key was retired (tokens outlive a key rotation until they expire)")
    # 3. Signature, before the payload is trusted or even parsed.
    if not hmac.compare_digest(given, _sign(key, kid, payload)):
        raise TokenError("bad_signature", "feedback_token signature does not match: the token was altered or "
                                          "not issued by this service")
    # 4. Claims: signed by us, so a failure here is a bug or a key shared with something else.
    try:
        raw = json.loads(_b64decode(payload))
        if set(raw) != set(_FIELDS) or not all(type(raw[f]) is t for f, t in _FIELDS.items()):
            raise ValueError(f"claims {sorted(raw)}")
        claims = TokenClaims(**raw)
    except (ValueError, TypeError) as err:
        raise TokenError("malformed", f"feedback_token payload is malformed ({err})") from None
    # 5. Expiry.
    now = time.time() if now is None else now
    if now >= claims.expires_at:
        raise TokenError("expired", f"feedback_token expired {int(now - claims.expires_at)} s ago; "
                                    "votes are accepted for a limited time after generation")
    return claims


def _keyring(keys: Keyring | bytes) -> Keyring:
    return keys if isinstance(keys, Keyring) else Keyring(keys)


def _sign(key: bytes, kid: str, payload_b64: str) -> bytes:
    return hmac.new(key, _DOMAIN + kid.encode() + b"." + payload_b64.encode(), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as err:
        raise ValueError(str(err)) from None
