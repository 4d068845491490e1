"""The API's own error responses in the OpenAPI document that BentoML serves at /docs.json.

BentoML lists 200 and its defaults (400, 404, 500 with its own error bodies) for every API method. What
/generate and /feedback really answer is below: `document_responses` puts it into the document and
`OpenApiMiddleware` applies it to every GET /docs.json, so clients and schemathesis (tests/test_serving_fuzz.py)
check responses against what the service does.
"""

import json

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What was wrong and what to do: for a bad field, its name, the "
                                                   "allowed range and the value received."},
        "reason": {"type": "string", "description": "Machine-readable reason: malformed, unknown_key, bad_signature, "
                                                    "expired, unauthenticated (401); other_identity (403); "
                                                    "rate_limited (429); queue_full, busy, ledger_busy, "
                                                    "vote_not_queued (503)."},
        "fields": {"type": "array", "description": "400: one entry per bad field.", "items": {
            "type": "object",
            "properties": {"field": {"type": "string"}, "message": {"type": "string"},
                           "type": {"type": "string", "nullable": True}}}},
    },
}
_RETRY_AFTER = {"Retry-After": {"required": True, "description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer", "minimum": 1}}}
_ERRORS = {
    400: "Invalid input: names each bad field and what it accepts.",
    401: "Feedback: the token is malformed, forged, altered, expired or of a retired key. Both routes, when the "
         "service is configured with an identity header: the request has none (it did not come through the proxy).",
    403: "Feedback: the token was issued to another identity (vote as the user or browser that generated the image).",
    413: "The body is larger than 64 KiB.",
    415: "The body is not application/json.",
    429: "Over this identity's rate limit for the route.",
    500: "Generation failed on the server (logged there); nothing about the request was wrong.",
    503: "At capacity: the generation queue is full, too many requests are in flight, the vote ledger is busy, or "
         "the event stream is backed up (the vote was not recorded).",
}
ROUTES = {"/generate": (200, (400, 401, 413, 415, 429, 500, 503)),
          "/feedback": (202, (400, 401, 403, 413, 415, 429, 503))}


def document_responses(spec: dict) -> dict:
    """`spec` (BentoML's document, as a dict) with the API routes' real responses."""
    spec.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
    for path, (success, errors) in ROUTES.items():
        operation = spec.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        responses = operation["responses"]
        ok = responses.get("200")
        operation["responses"] = {str(success): {**ok, "description": "Accepted" if success == 202 else "OK"}}
        for status in errors:
            response = {"description": _ERRORS[status],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            if status in (429, 503):
                response["headers"] = _RETRY_AFTER
            operation["responses"][str(status)] = response
    return spec


class OpenApiMiddleware:
    """ASGI middleware: GET /docs.json answers BentoML's document with `document_responses` applied."""

    def __init__(self, app, path: str = "/docs.json"):
        self.app = app
        self.path = path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = json.dumps(document_responses(json.loads(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)
