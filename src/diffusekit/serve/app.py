"""``create_app(config)``: the FastAPI application; ``serve(config)``: run it with uvicorn.

Security, from the outside in: the API key (when set) is checked on every request, the web page included
(``Authorization: Bearer KEY``, ``X-API-Key: KEY``, or HTTP Basic with the key as password, so a browser asks for it
once and A1111 clients' ``--api-auth`` style ``user:password`` works); request bodies larger than
``max_body_bytes`` are refused with 413 before they are read; CORS headers only for ``--cors-origin`` origins.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
from importlib import resources
from typing import Any

from .config import ServeConfig
from .jobs import JobQueue, JobRequest, QueueFull, Worker
from .models import ModelHolder, ModelRegistry

logger = logging.getLogger(__name__)

PREFERRED_DEFAULT = "diffusekit-fashion-sd"


class ServerState:
    """What the routes share: config, model registry and holder, queue, worker, the current default model."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.registry = ModelRegistry(config.models_dir)
        self.holder = ModelHolder(self.registry, config.device, config.optimize)
        self.queue = JobQueue(config.queue_size, config.keep_jobs)
        self.worker = Worker(self.queue, self.holder)
        self.model_name = self._default_model()

    def _default_model(self) -> str:
        if self.config.default_model:
            return self.registry.resolve(self.config.default_model).name
        entries = self.registry.entries()
        own = [e.name for e in entries.values() if not e.bundled]
        if own:
            return own[0]
        if PREFERRED_DEFAULT in entries:
            return PREFERRED_DEFAULT
        if not entries:
            raise ValueError("no models to serve: the bundled models are missing and --models has none")
        return next(iter(entries))

    def submit(self, request: JobRequest, source: str = "api"):
        from fastapi import HTTPException

        from .jobs import Job

        job = Job(request, source)
        try:
            self.queue.submit(job)
        except QueueFull as exc:
            raise HTTPException(status_code=429, detail=str(exc), headers={"Retry-After": "5"}) from None
        return job


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (by Content-Length, or counted while streaming)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than this server's limit of {self.limit} bytes (--max-body-mb)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    return await _send_json(send, 400, "invalid Content-Length header")
                if too_big:
                    return await _send_json(send, 413, message)
        seen = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            event = await receive()
            if event["type"] == "http.request":
                seen += len(event.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is replaced below
            return event

        async def guarded_send(event):
            nonlocal started
            if exceeded:
                return  # whatever the app says about the cut-off body, the client gets the 413
            started = True
            await send(event)

        await self.app(scope, limited_receive, guarded_send)
        if exceeded and not started:
            await _send_json(send, 413, message)


class ApiKey:
    """ASGI middleware: every request must carry the key (Bearer, X-API-Key, or Basic password)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    def _ok(self, headers) -> bool:
        for name, value in headers:
            if name == b"x-api-key" and hmac.compare_digest(value, self.key):
                return True
            if name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.key):
                    return True
                if scheme.lower() == b"basic":
                    try:
                        _, _, password = base64.b64decode(credential.strip()).partition(b":")
                    except ValueError:
                        return False
                    if hmac.compare_digest(password, self.key):
                        return True
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._ok(scope.get("headers", ())):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _send_json(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY', 'X-API-Key: KEY' "
                         "or HTTP Basic auth with the key as password",
                         [(b"www-authenticate", b'Basic realm="diffusekit"')])


def create_app(config: ServeConfig | None = None, **options: Any):
    """The FastAPI app for ``config`` (or ``ServeConfig(**options)``); starts its worker when the app starts."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from . import a1111, jobs_api

    config = config or ServeConfig(**options)
    state = ServerState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        state.submit(JobRequest(model=state.model_name, kind="load"), source="startup")
        yield
        state.worker.stop()

    app = FastAPI(title="diffusekit", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.serve = state

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    app.include_router(a1111.router(state))
    app.include_router(jobs_api.router(state))
    static = resources.files("diffusekit.serve") / "static"

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)  # added last: runs first, before anything reads the body
    return app


def _version() -> str:
    from .. import __version__

    return __version__


def serve(config: ServeConfig) -> None:
    """Run the server in the foreground until interrupted (Ctrl-C)."""
    import uvicorn

    config.check_exposure()
    app = create_app(config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"diffusekit serve: http://{host}:{config.port}/ (A1111 API under /sdapi/v1, jobs under /v1)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
