"""The FastAPI application: routes, error answers, and the once-a-second job reaper.

Routes live in the ``api_*`` modules; each parses, calls an action (or the job store) and
renders. Every error is JSON ``{"error": code, "message": ...}`` (:mod:`server.errors`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conexa_backup import __version__
from conexa_backup.config.server import is_loopback
from conexa_backup.errors import ConexaError
from conexa_backup.logs import LOGGER
from conexa_backup.server import api_delete, api_download, api_jobs, api_list, api_page
from conexa_backup.server.errors import answer
from conexa_backup.server.services import Services
from conexa_backup.server.trail import AuditTrail

OPENAPI_URL = "/api/admin/openapi.json"
TICK = 1.0  # seconds between two reaps of ended jobs
MAX_BODY = 64 * 1024  # bytes: the largest body any route takes is a restore's few fields
_log = logging.getLogger(LOGGER)


class BodyLimit:
    """ASGI middleware: a request body over :data:`MAX_BODY` is refused with 413 before it is
    read whole. FastAPI reads (and parses) a body before the route's token check, so without
    this anyone could make the server hold any size of body in memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            await _too_large(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:  # chunked: no length said up front
                raise HTTPException(413, f"the request body exceeds {MAX_BODY} bytes")
            return message

        await self.app(scope, counted, send)


class LoopbackHostOnly:
    """ASGI middleware for ``insecure_no_auth``: only requests naming a loopback host
    (``Host: 127.0.0.1:PORT``, ``localhost``, ``[::1]``) are served. Without a token to
    check, a web page could otherwise reach the API through a DNS name rebound to
    127.0.0.1 (its requests carry that name in ``Host``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_loopback(_host(scope)):
            answer = JSONResponse({"error": "bad_host", "message": "insecure_no_auth serves "
                                   "loopback names only (Host: 127.0.0.1, localhost, [::1])"},
                                  status_code=421)
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _host(scope: Scope) -> str:
    """The host named by the request's ``Host`` header, without its port or brackets."""
    raw: bytes = dict(scope.get("headers", [])).get(b"host", b"")
    value = raw.decode("latin-1").strip()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    answer = JSONResponse({"error": "body_too_large",
                           "message": f"the request body exceeds {MAX_BODY} bytes"},
                          status_code=413, headers={"Connection": "close"})
    await answer(scope, receive, send)


def create_app(services: Services) -> FastAPI:
    """The API over ``services``; jobs left running by a previous server are recovered when
    it starts serving."""
    app = FastAPI(title="conexa-backup", version=__version__, openapi_url=OPENAPI_URL,
                  docs_url=None, redoc_url=None, lifespan=_lifespan)
    app.state.services = services
    cors = services.config.server.cors_origins if services.config.server else []
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Range", "If-Range"],
                           expose_headers=["Content-Disposition", "Content-Range",
                                           "Content-Length", "ETag", "Accept-Ranges",
                                           "X-Conexa-Target"])
    app.add_middleware(AuditTrail, services=services)
    if services.config.server is not None and services.config.server.auth.insecure_no_auth:
        app.add_middleware(LoopbackHostOnly)
    app.add_middleware(BodyLimit)  # outermost of ours: nothing reads an oversized body
    _install_error_handlers(app)
    for module in (api_list, api_download, api_jobs, api_delete, api_page):
        app.include_router(module.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Whether the server runs: no token, no detail. Answered on the event loop, not a
        worker thread: it answers even while every worker waits on a target."""
        return {"status": "ok"}

    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    services: Services = app.state.services
    for job in services.jobs.recover():
        _log.warning("job %s (%s) failed: the server restarted while it ran", job.id, job.kind)
    # Take the list snapshot now, not in the first request (a few seconds at 1,000 backups).
    threading.Thread(target=services.listing.get, name="list-warm", daemon=True).start()
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(services, stop), name="reaper", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join(timeout=5)


def _tick(services: Services, stop: threading.Event) -> None:
    while not stop.wait(TICK):
        try:
            services.tick()
        except Exception:  # the reaper must outlive one bad job file
            _log.exception("job reaper")


def _install_error_handlers(app: FastAPI) -> None:
    services: Services = app.state.services

    @app.exception_handler(ConexaError)
    async def conexa_error(request: Request, exc: ConexaError) -> JSONResponse:
        found = answer(exc, services.redact)
        if found.status >= 500:
            _log.error("%s %s: %s", request.method, request.url.path, found.body["message"])
        return JSONResponse(found.body, status_code=found.status)

    @app.exception_handler(RequestValidationError)
    async def bad_input(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return JSONResponse({"error": "bad_input", "message": message}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed",
                413: "body_too_large"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "message": str(exc.detail)},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        _log.error("%s %s failed unexpectedly", request.method, request.url.path,
                   exc_info=exc)
        return JSONResponse(answer(exc).body, status_code=500)
