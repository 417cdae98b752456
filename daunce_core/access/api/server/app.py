"""The HTTP application: OpenAI's files, fine-tuning, models and completions endpoints.

Every ``/v1`` and ``/admin`` request needs ``Authorization: Bearer <key>`` (unless the server
runs without keys). `Gate`, the outermost ASGI layer, checks the key, applies the injected
faults (`daunce_core.access.api.server.faults`) to ``/v1`` requests and counts every answer
by endpoint and status for ``GET /admin/stats``. Errors are answered in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from fastapi import Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from daunce_core.access.api.server import endpoints
from daunce_core.access.api.server.errors import ApiError, bad_request
from daunce_core.access.api.server.faults import Faults, retry_after_header
from daunce_core.access.api.server.models import Registry
from daunce_core.access.api.server.state import Store, public
from daunce_core.access.api.server.worker import DONE, TrainDefaults, Trainer
from daunce_core.errors import DaunceError

log = logging.getLogger("daunce.api.server")


@dataclass
class Server:
    """Everything the endpoints share."""

    store: Store
    registry: Registry
    trainer: Trainer
    faults: Faults
    defaults: TrainDefaults
    keys: frozenset[str]
    max_batch: int = 64
    requests: defaultdict = field(default_factory=lambda: defaultdict(Counter))


def _error(error: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Gate:
    """The outermost ASGI layer: keys, injected faults and request counts."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        """Answer one ASGI connection (counted in the request statistics)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = {"status": "dropped"}

        async def counting(message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send, counting)
        finally:
            route = scope.get("route")
            name = f"{scope['method']} {getattr(route, 'path', scope['path'])}"
            self.server.requests[name][str(answered["status"])] += 1

    async def _handle(self, scope, receive, send, counting) -> None:
        path = scope["path"]
        guarded = path.startswith(("/v1/", "/admin/")) or path in ("/v1", "/admin")
        if guarded and not self._authorised(scope):
            error = ApiError(
                401,
                "Incorrect API key provided; send Authorization: Bearer <key> with a key given "
                "to the server (--api-key or DAUNCE_SERVER_API_KEYS).",
                code="invalid_api_key",
            )
            await _error(error)(scope, receive, counting)
            return
        if path.startswith("/v1"):
            verdict = self.server.faults.request()
            if verdict.status == 429:
                error = ApiError(
                    429,
                    "Rate limit reached (injected fault rate_limit); retry after the "
                    "Retry-After header's seconds.",
                    code="rate_limit_exceeded",
                )
                await _error(error, retry_after_header(verdict.retry_after))(
                    scope, receive, counting
                )
                return
            if verdict.delay:
                await asyncio.sleep(verdict.delay)
            if verdict.drop and await self._drop(send):
                return
            if verdict.status:
                error = ApiError(verdict.status, "Injected server error (fault error_rate); retry.")
                await _error(error)(scope, receive, counting)
                return
        await self.app(scope, receive, counting)

    def _authorised(self, scope) -> bool:
        if not self.server.keys:
            return True
        headers = dict(scope["headers"])
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = value.partition(" ")
        return scheme.lower() == "bearer" and key.strip() in self.server.keys

    @staticmethod
    async def _drop(send) -> bool:
        """Close the connection without an answer (uvicorn's transport); False if impossible."""
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is None:
            return False
        transport.abort()
        for _ in range(3):
            await asyncio.sleep(0)
        return True


def create_app(server: Server) -> Gate:
    """The ASGI application of ``server`` (FastAPI behind the `Gate`)."""
    app = FastAPI(title="daunce OpenAI-compatible server", docs_url=None, redoc_url=None)
    _handlers(app)
    _files(app, server)
    _jobs(app, server)
    _inference(app, server)
    _admin(app, server)
    return Gate(app, server)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error)

    @app.exception_handler(DaunceError)
    async def daunce_error(request: Request, error: DaunceError):
        return _error(bad_request(str(error)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
            for e in error.errors()
        )
        first = error.errors()[0]["loc"][1:] if error.errors() else ()
        param = str(first[0]) if first else None
        return _error(bad_request(f"Invalid request: {problems}.", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _error(ApiError(error.status_code, message))

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(ApiError(500, f"The server failed: {type(error).__name__}: {error}"))

    @app.get("/health")
    def health():
        return {"status": "ok"}


def _listing(items: list[dict], after: str | None, limit: int, most: int = 100) -> dict:
    """An OpenAI list object over ``items`` (newest first), from after the id ``after``."""
    if not 1 <= limit <= most:
        raise bad_request(f"limit must be between 1 and {most}; got {limit}.", param="limit")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"after={after!r} names no item of this list.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(items) > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


def _files(app: FastAPI, server: Server) -> None:
    store = server.store

    def found(file_id: str) -> dict:
        record = store.file(file_id)
        if record is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return record

    @app.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):  # noqa: B008
        content = await file.read()
        if not purpose:
            raise bad_request("purpose must be given, e.g. 'fine-tune'.", param="purpose")
        return store.add_file(file.filename or "upload.jsonl", purpose, content)

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, limit: int = 10000, after: str | None = None):
        items = [f for f in reversed(store.files()) if purpose in (None, f["purpose"])]
        return _listing(items, after, limit, most=10000)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str):
        return found(file_id)

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str):
        found(file_id)
        return Response(store.file_content(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str):
        found(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}


def _jobs(app: FastAPI, server: Server) -> None:
    store = server.store

    def found(job_id: str) -> dict:
        job = store.job(job_id)
        if job is None:
            raise ApiError(404, f"No fine-tuning job found with id {job_id!r}.", param="id")
        return job

    @app.post("/v1/fine_tuning/jobs")
    def create_job(body: dict = Body(...)):  # noqa: B008
        job = endpoints.new_job(server, body)
        job["_fail"] = server.faults.job_fails()
        job["_seq"] = time.time_ns()
        store.save_job(job)
        store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        log.info(
            "job %s: validating_files (suffix %s, seed %s)", job["id"], job["suffix"], job["seed"]
        )
        server.trainer.submit(job["id"])
        if server.faults.lose_reply():  # the job exists; its answer is "lost"
            raise ApiError(500, "The server had an error while processing your request.")
        return public(job)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int = 20):
        # OpenAI's filter ``metadata[key]=value``: every pair given must match.
        wanted = {
            key[len("metadata[") : -1]: value
            for key, value in request.query_params.items()
            if key.startswith("metadata[") and key.endswith("]")
        }
        jobs = [
            public(j)
            for j in reversed(store.jobs())
            if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())
        ]
        return _listing(jobs, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str):
        return public(found(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: int = 20):
        found(job_id)
        return _listing(list(reversed(store.events(job_id))), after, limit)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str):
        found(job_id)
        job = store.update_job(
            job_id, unless=DONE, status="cancelled", finished_at=int(time.time())
        )
        if job is None:
            status = store.job(job_id)["status"]
            raise bad_request(
                f"Job {job_id} is already {status}; only active jobs can be cancelled."
            )
        store.add_event(job_id, "Fine-tuning job cancelled by the user")
        log.info("job %s: cancelled", job_id)
        return public(job)


def _inference(app: FastAPI, server: Server) -> None:
    registry = server.registry

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": registry.models()}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str):
        for model in registry.models():
            if model["id"] == model_id:
                return model
        raise endpoints.not_found(model_id)

    @app.delete("/v1/models/{model_id:path}")
    def delete_model(model_id: str):
        if model_id == registry.base_id:
            raise bad_request(
                f"{model_id!r} is the base model; only fine-tuned models can be deleted."
            )
        job = registry.job_of(model_id)
        if job is None:
            raise endpoints.not_found(model_id)
        server.store.delete_adapter(job["id"])
        registry.forget(model_id)
        return {"id": model_id, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    def completions(body: dict = Body(...)):  # noqa: B008
        return endpoints.completions(server, body)

    @app.post("/v1/chat/completions")
    def chat_completions(body: dict = Body(...)):  # noqa: B008
        return endpoints.chat_completions(server, body)


def _admin(app: FastAPI, server: Server) -> None:
    @app.get("/admin/faults")
    def get_faults():
        return server.faults.as_dict()

    @app.put("/admin/faults")
    def put_faults(body: dict = Body(...)):  # noqa: B008
        body = {k: v for k, v in body.items() if k != "jobs_left_to_fail"}
        server.faults.update(body)
        log.info("faults set: %s", server.faults.as_dict())
        return server.faults.as_dict()

    @app.get("/admin/stats")
    def stats():
        jobs = server.store.jobs()
        return {
            "requests": {name: dict(counts) for name, counts in server.requests.items()},
            "jobs_by_suffix": dict(Counter(j.get("suffix") or "" for j in jobs)),
            "jobs_by_status": dict(Counter(j["status"] for j in jobs)),
            "jobs": len(jobs),
        }
