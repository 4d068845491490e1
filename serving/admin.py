"""Admin routes under /admin: publish an adapter, start a canary, promote, roll back, retire, read the rollout.

    curl -H "Authorization: Bearer $(cat $ALIGNLOOP_HOME/secrets/admin_token)" http://127.0.0.1:3000/admin/rollout

Every route needs the admin bearer token (secret `admin_token`: $ALIGNLOOP_ADMIN_TOKEN, or a 0600 file under
ALIGNLOOP_HOME/secrets created on first use; never in the repository), compared in constant time; without it
or with a wrong one: 401. The routes call alignloop.rollout, which writes the change to the registry; no
worker keeps state of its own about it. An admin request reaches one worker, and every worker (this one
included) converges by polling the registry, within `rollout_poll_s` plus the time to load an adapter.
GET /admin/rollout says what the worker that answered serves now (its pid, rollout id, resident adapters).

Publishing takes the adapter file in the request body (`application/octet-stream`, at most
`max_adapter_upload_bytes`) rather than a path on the server: a path would let a token holder make the service
read any file it can read (its own secrets included) into the registry, and would work only on the host that
has the file. The upload reads nothing of the server's; publish_adapter checks the file parses and is finite
before anything is written, and each worker checks it against its base UNet before it takes traffic.
The OpenAPI document of these routes is GET /admin/openapi.json (public, like /docs.json).
"""

import hmac
import json
import os
from functools import lru_cache
from typing import Callable, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from alignloop.errors import UserFacingError
from alignloop.secrets import load_secret

_WHO = "admin via HTTP"


@lru_cache(maxsize=1)
def admin_token() -> bytes:
    return load_secret("admin_token")


def admin_app(worker: Callable[[], Optional[object]], registry_url: Optional[str], max_upload_bytes: int,
              token: Callable[[], bytes] = admin_token) -> Starlette:
    """Mounted at /admin. `worker()` is this worker's RolloutFollower (None until it has loaded)."""

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token())

    def guarded(handler):
        async def endpoint(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "admin routes need 'Authorization: Bearer <admin token>' (the "
                                              "admin_token secret)", "reason": "unauthorized"},
                                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="alignloop admin"'})
            try:
                return await handler(request)
            except _BadRequest as err:
                return JSONResponse({"error": str(err)}, status_code=err.status)
            except UserFacingError as err:  # RolloutError, RegistryError: what to do instead
                return JSONResponse({"error": str(err)}, status_code=409)
        return endpoint

    def registry():
        from alignloop.registry import Registry

        return Registry(registry_url)

    # Registry reads and writes (files or an object store), the upload's checks and the base UNet's hash block for
    # seconds: they run on the thread pool, not on the event loop this worker's /generate and /feedback share.
    async def rollout_state(request: Request):
        return JSONResponse(await run_in_threadpool(_rollout_state))

    def _rollout_state() -> dict:
        from alignloop.rollout import current_rollout, problems

        reg = registry()
        current = current_rollout(reg)
        follower = worker()
        return {
            "registry": {"url": reg.url, "rollout": json.loads(current.model_dump_json()) if current else None,
                         "adapters": [{"version": m.version, "state": m.state, "reason": m.reason}
                                      for m in reg.versions("adapter")],
                         "problems": problems(reg, current)},
            "worker": _worker_state(follower),
        }

    async def publish(request: Request):
        from alignloop.adapters import WEIGHTS, lora_config_from_header
        from alignloop.rollout import RolloutError, publish_adapter

        base_hash = request.query_params.get("base_unet_sha256", "")
        why = request.query_params.get("why", "").strip()
        if len(base_hash) != 64 or any(c not in "0123456789abcdef" for c in base_hash):
            raise _BadRequest("query parameter base_unet_sha256 must be the 64-hex-digit hash of the UNet the adapter "
                              "was trained on (GET /admin/rollout shows this service's)")
        if not why:
            raise _BadRequest("query parameter why must say why this adapter is published (it goes into its history)")
        body = await _bounded_body(request, max_upload_bytes)
        if not body:
            raise _BadRequest("the body is empty; send the adapter's pytorch_lora_weights.safetensors as the body")
        try:
            header = _header_of(body)
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
            raise _BadRequest("the body is not a safetensors file (send pytorch_lora_weights.safetensors)") from None
        try:
            config = lora_config_from_header(header, "the uploaded adapter")  # rank, alpha, target modules
        except UserFacingError as err:
            raise _BadRequest(str(err)) from None
        try:
            manifest = await run_in_threadpool(publish_adapter, registry(), {WEIGHTS: body},
                                               base={"unet_sha256": base_hash}, config=config,
                                               parent=request.query_params.get("parent") or None,
                                               who=request.query_params.get("who") or _WHO, why=why)
        except RolloutError as err:  # the file's own checks (no tensors, NaN or Inf): the request is at fault
            raise _BadRequest(str(err)) from None
        return JSONResponse({"version": manifest.version, "state": manifest.state}, status_code=201)

    async def canary(request: Request):
        from alignloop.rollout import start_canary

        body = await _json(request, {"version": str, "share": float, "why": str})
        rollout = await run_in_threadpool(start_canary, registry(), body["version"], body["share"],
                                          body.get("who") or _WHO, body["why"])
        return JSONResponse(json.loads(rollout.model_dump_json()))

    async def promote(request: Request):
        from alignloop.rollout import promote as promote_version

        body = await _json(request, {"version": str, "why": str})
        rollout = await run_in_threadpool(promote_version, registry(), body["version"], body.get("who") or _WHO,
                                          body["why"])
        return JSONResponse(json.loads(rollout.model_dump_json()))

    async def rollback(request: Request):
        from alignloop.rollout import rollback as roll_back

        body = await _json(request, {"why": str})
        rollout = await run_in_threadpool(roll_back, registry(), body.get("who") or _WHO, body["why"])
        return JSONResponse(json.loads(rollout.model_dump_json()))

    async def retire(request: Request):
        from alignloop.rollout import retire as retire_version

        body = await _json(request, {"version": str, "why": str})
        manifest = await run_in_threadpool(retire_version, registry(), body["version"], body.get("who") or _WHO,
                                           body["why"])
        return JSONResponse({"version": manifest.version, "state": manifest.state})

    async def openapi(_request: Request):
        return JSONResponse(OPENAPI)

    return Starlette(routes=[
        Route("/rollout", guarded(rollout_state), methods=["GET"]),
        Route("/adapters", guarded(publish), methods=["POST"]),
        Route("/rollout/canary", guarded(canary), methods=["POST"]),
        Route("/rollout/promote", guarded(promote), methods=["POST"]),
        Route("/rollout/rollback", guarded(rollback), methods=["POST"]),
        Route("/rollout/retire", guarded(retire), methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ])


def _worker_state(follower) -> dict:
    state = {"pid": os.getpid()}
    if follower is None:
        return {**state, "ready": False}
    table = follower.table
    return {**state, "ready": True, "settled": follower.settled, "rollout_id": table.rollout_id,
            "arms": [{"name": a.name, "adapter": a.adapter, "share": a.share} for a in table.arms],
            "resident": follower.slots.resident(), "refused": follower.refused(), "last_switch": follower.last_switch,
            "base": follower.slots.identity}


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _header_of(body: bytes) -> dict:
    """The safetensors header's __metadata__ of an in-memory file."""
    size = int.from_bytes(body[:8], "little")
    metadata = json.loads(body[8:8 + size]).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not an object")
    return metadata


async def _bounded_body(request: Request, limit: int, what: str = "the adapter file") -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(f"{what} is {declared} bytes; at most {limit} are accepted", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(f"{what} is over {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


MAX_JSON_BYTES = 64 * 1024  # the admin routes' JSON bodies (a version, a share, a why): the API's own bound


async def _json(request: Request, required: dict) -> dict:
    try:
        body = json.loads(await _bounded_body(request, MAX_JSON_BYTES, what="the JSON body") or b"null")
    except (ValueError, RecursionError):
        raise _BadRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest(f"the body must be a JSON object with {sorted(required)}")
    for name, kind in required.items():
        value = body.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = body[name] = float(value)
        if not isinstance(value, kind) or (kind is str and not value.strip()):
            raise _BadRequest(f"{name} must be a {'number' if kind is float else 'non-empty string'}, got {value!r}")
    return body


def _op(summary: str, body: Optional[dict] = None, ok: str = "200") -> dict:
    op = {"summary": summary, "security": [{"adminToken": []}],
          "responses": {ok: {"description": "done"},
                        "401": {"description": "missing or wrong admin bearer token",
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                        "409": {"description": "the change cannot be made as asked (the message says why)"}}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": [k for k in body if k != "who"],
            "properties": {k: {"type": v} for k, v in body.items()}}}}}
        op["responses"]["400"] = {"description": "a field is missing or malformed"}
    return op


def _with_responses(op: dict, more: dict) -> dict:
    return {**op, "responses": {**op["responses"], **{code: {"description": what} for code, what in more.items()}}}


OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "alignloop admin", "version": "1"},
    "components": {
        "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"},
                                                              "reason": {"type": "string"}}}},
    },
    "paths": {
        "/admin/rollout": {"get": _op("the registry's rollout and adapters, and what the answering worker serves")},
        "/admin/adapters": {"post": _with_responses(
            {**_op("publish an adapter as a candidate (body: pytorch_lora_weights.safetensors)", ok="201"),
            "parameters": [{"name": n, "in": "query", "required": r, "schema": {"type": "string"}}
                           for n, r in (("base_unet_sha256", True), ("why", True), ("parent", False), ("who", False))],
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}},
            {"400": "a query parameter is missing or malformed, or the body is not a LoRA safetensors file with "
                    "diffusers' LoRA header", "413": "the body is over max_adapter_upload_bytes"})},
        "/admin/rollout/canary": {"post": _op("serve a candidate to a share of users (arm B)",
                                              {"version": "string", "share": "number", "why": "string",
                                               "who": "string"})},
        "/admin/rollout/promote": {"post": _op("make an adapter live for every user",
                                               {"version": "string", "why": "string", "who": "string"})},
        "/admin/rollout/rollback": {"post": _op("undo one step (retire the canary, or go back to the previous live)",
                                                {"why": "string", "who": "string"})},
        "/admin/rollout/retire": {"post": _op("serve an adapter no more",
                                              {"version": "string", "why": "string", "who": "string"})},
    },
}
