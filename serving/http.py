"""HTTP plumbing around the API methods: error bodies a person can act on, a request-size bound, the /ui app.

BentoML validates request bodies against the schemas and answers a failure with 400 and pydantic's error
list under a generic title ("1 validation error for GenerateRequest"). `ApiErrorMiddleware` rewrites that
title into one sentence naming each bad field and what it accepts ("n: Input should be less than or equal
to 64"), keeps the per-field list, refuses bodies that are not JSON with 415 and bodies over
`max_body_bytes` with 413 before they are read.
"""

import json
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024  # the largest valid request is ~3 KB (a 2 KB token or a 500-character prompt)


def describe_errors(detail: list) -> tuple[str, list]:
    """pydantic errors -> ("field: message; field: message", [{"field", "message", "type"}])."""
    fields = []
    for err in detail if isinstance(detail, list) else []:
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body",)]
        name = ".".join(loc) or "body"
        message = str(err.get("msg", "invalid value"))
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        fields.append({"field": name, "message": message, "type": err.get("type")})
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
    return summary, fields


def json_error(status: int, message: str, retry_after_s: int | None = None, **extra) -> Response:
    """The body every error of the API has (serving/openapi.py documents it); 429 and 503 say when to retry."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return Response(json.dumps({"error": message, **extra}), status_code=status, media_type="application/json",
                    headers=headers)


class ApiErrorMiddleware:
    """ASGI middleware for the API routes (`paths`): 415 for non-JSON bodies, 413 for oversized ones,
    readable 4xx bodies."""

    def __init__(self, app, paths=("/generate", "/feedback"), max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.paths = set(paths)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)

        # 1. JSON only. BentoML would also parse forms and multipart; refusing them keeps the contract to one
        #    encoding and means a cross-site HTML form (no CORS preflight) cannot post to the API.
        headers = dict(scope.get("headers") or [])
        media_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            return await json_error(415, f"Content-Type must be application/json, got {media_type.decode('latin-1')!r}")(
                scope, receive, send)

        # 2. Bound the body: by its declared length, and by counting when it is chunked.
        declared = headers.get(b"content-length")
        too_large = json_error(413, f"request body must be at most {self.max_body_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large(scope, receive, send)
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge()
            return message

        # 3. Hold back a 4xx body to rewrite it; stream everything else through.
        state = {"status": None, "start": None, "chunks": []}

        def held(status):
            return 400 <= status < 500

        async def rewriting_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                if not held(message["status"]):
                    return await send(message)
                state["start"] = message
                return
            if not held(state["status"]):
                return await send(message)
            state["chunks"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = _readable_4xx(b"".join(state["chunks"]))
            start = state["start"]
            start_headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            start_headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": start_headers})
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, bounded_receive, rewriting_send)
        except _BodyTooLarge:
            if state["status"] is None:
                await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _readable_4xx(body: bytes) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        summary, fields = describe_errors(data["detail"])
        return json.dumps({"error": summary, "fields": fields}).encode()
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):  # BentoML wraps some 4xx in a list
        return json.dumps(data[0]).encode()
    return body


class QuietClientErrors(logging.Filter):
    """For BentoML's exception logger: a request that failed validation is the client's error, answered
    with a 400. Log one line, not a traceback whose pydantic message quotes request values (user ids)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            record.msg, record.args = "rejected an invalid request to %s with 400 (%d field error(s))", (
                record.args[0] if record.args else "?", exc.error_count())
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def install_log_filters() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietClientErrors())
    logging.getLogger("alignloop").setLevel(logging.INFO)  # our JSON lines go to BentoML's handlers


# -- the web page ----------------------------------------------------------------------------------------------

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
                     "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


async def _page(request):
    """The page; a browser without a valid anonymous cookie gets one, so its arm is sticky (serving/arms.py)."""
    from alignloop.serving.arms import ANON_COOKIE, ANON_COOKIE_MAX_AGE_S, anon_id_from_cookie, mint_anon_cookie

    response = HTMLResponse((STATIC / "ui.html").read_text(), headers=_SECURITY_HEADERS)
    if anon_id_from_cookie(request.cookies.get(ANON_COOKIE)) is None:
        response.set_cookie(ANON_COOKIE, mint_anon_cookie(), max_age=ANON_COOKIE_MAX_AGE_S, path="/", httponly=True,
                            samesite="lax", secure=request.url.scheme == "https")
    return response


def _asset(name: str, media_type: str):
    async def endpoint(_request):
        return FileResponse(STATIC / name, media_type=media_type, headers=_SECURITY_HEADERS)
    return endpoint


def ui_app() -> Starlette:
    """Mounted at /ui: the page and its script and stylesheet; no external asset, no CDN."""
    return Starlette(routes=[
        Route("/", _page),
        Route("/ui.js", _asset("ui.js", "text/javascript")),
        Route("/ui.css", _asset("ui.css", "text/css")),
    ])
