"""The HTTP API (FastAPI). Stateless: every request goes to PostgreSQL and Redis, so any number
of replicas can run side by side. Every operation is the one the CLI runs (ops.py).

Errors are JSON `{"error": <code>, "message": <text>}` (plus `detail` for 422): 401 without a
known bearer token, 403 when its scopes do not allow the call, 404, 409 (an Idempotency-Key
reused with another body), 413 (body over API_MAX_BODY_BYTES), 422 (validation, including the
worker's own URL rules and the SSRF rules for callback URLs), 429 (API_RATE_LIMIT_PER_MIN, or a
tenant's queued-scans quota; both with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, ops
from ..callbacks import check_callback_url
from ..config import Settings
from ..consumer import Consumer, connect
from ..errors import is_transient
from ..fetcher import netcheck
from ..models import State, Verdict
from ..pipeline import url_problem
from ..store import QuotaExceeded, Store, Submission, create_pool
from .artifacts import Kind, artifact_response
from .config import ApiSettings, ApiToken, find_token
from .console import add_console
from .schemas import (
    DeadLetterPage,
    ErrorBody,
    PurgeResult,
    ReplayRequest,
    ReplayResult,
    RetryRequest,
    RetryResult,
    ScanAccepted,
    ScanDetail,
    ScanPage,
    ScanRequest,
    ScanSummary,
)


@dataclasses.dataclass(frozen=True)
class Services:
    settings: Settings
    api: ApiSettings
    store: Store
    consumer: Consumer  # says everything the API says to the streams
    tokens: list[ApiToken]
    session_key: bytes  # console sessions (API_SESSION_SECRET, or random for this process)


@contextlib.asynccontextmanager
async def services(settings: Settings, api: ApiSettings, pool_size: int = 5
                   ) -> AsyncIterator[Services]:
    pool = await create_pool(settings.database_url, pool_size)
    client = connect(settings.redis_dsn)
    consumer = Consumer(client, settings.scan_stream, settings.scan_group,
                        f"api-{settings.worker_id}", settings.dead_letter_stream,
                        settings.dead_letter_maxlen, lanes=settings.lane_weights)
    try:
        yield Services(settings, api, Store(pool, api.callback_default_url,
                                            notify=api.notify_finished), consumer, api.tokens,
                       session_key(api))
    finally:
        await client.aclose()
        await pool.close()


def session_key(api: ApiSettings) -> bytes:
    if api.api_session_secret:
        return hashlib.sha256(b"safeurl-console|" + api.api_session_secret.encode()).digest()
    return secrets.token_bytes(32)


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.headers = status, error, message, headers


def _error(status: int, error: str, message: str, detail: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=error, message=message, detail=detail)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in [
        (401, "no or unknown bearer token"), (403, "the token lacks the scope"),
        (422, "invalid request"), (429, "rate limit of the token reached")]}
_QUOTA_429 = {"model": ErrorBody, "description": "rate limit of the token, or the tenant's "
              "queued-scans quota, reached (see Retry-After)"}


# --- auth and limits --------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="a token from API_TOKENS")


def scope(name: str) -> Callable[..., Awaitable[ApiToken]]:
    """A dependency: the caller's token, which must carry scope `name` and be under its rate
    limit."""
    async def dep(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiToken:
        svc: Services = request.app.state.services
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>",
                           {"WWW-Authenticate": "Bearer"})
        token = find_token(svc.tokens, credentials.credentials)
        if token is None:
            raise ApiError(401, "unauthorized", "unknown token", {"WWW-Authenticate": "Bearer"})
        if name not in token.scopes:
            raise ApiError(403, "forbidden",
                           f"token {token.name!r} lacks the {name!r} scope "
                           f"(it has: {', '.join(sorted(token.scopes))})")
        await _rate_limit(svc, token)
        return token
    return dep


async def _rate_limit(svc: Services, token: ApiToken) -> None:
    """A fixed one-minute window per token, counted in Redis so replicas share it."""
    limit = svc.api.api_rate_limit_per_min
    if not limit:
        return
    window = int(time.time() // 60)
    key = f"safeurl:api:rate:{svc.settings.scan_stream}:{token.name}:{window}"
    pipe = svc.consumer.redis.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, 120)
    count, _ = await pipe.execute()
    if int(count) > limit:
        retry = 60 - int(time.time()) % 60
        raise ApiError(429, "rate_limited", f"token {token.name!r}: more than {limit} "
                       "requests this minute", {"Retry-After": str(retry)})


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether announced (Content-Length) or
    streamed (chunked). The body is read here, before the app: an error raised from inside the
    app's own body parsing would come out as FastAPI's 400. Bodies are small (the limit is
    tens of KiB), so holding one in memory costs nothing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send)
            return
        body = await self._read(receive)
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (or the client went away)."""
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = _error(413, "too_large", f"request body over {self.limit} bytes")
        await resp(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then waits on the client (for a
    disconnect) as the server's own would."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


# --- the app ----------------------------------------------------------------------------------

def create_app(svc: Services) -> FastAPI:
    app = FastAPI(title="SafeURL Worker API", version=__version__,
                  description="Submit URL scans, read their results, operate the fleet. "
                  "See docs/api.md.", responses=_ERRORS)
    app.state.services = svc
    _handlers(app)
    _scan_routes(app)
    _operator_routes(app)
    add_console(app)
    app.add_middleware(BodyLimit, limit=svc.api.api_max_body_bytes)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        first = detail[0] if detail else {"loc": [], "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"])
        return _error(422, "invalid_request", f"{where}: {first['msg']}", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        if is_transient(exc):  # PostgreSQL or Redis down: try again later
            return _error(503, "unavailable", f"a dependency is unavailable: "
                          f"{type(exc).__name__}", headers={"Retry-After": "5"})
        return _error(500, "internal", f"{type(exc).__name__}")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}


def _services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


Svc = Annotated[Services, Depends(_services)]


def _scan_routes(app: FastAPI) -> None:
    @app.post("/v1/scans", status_code=202, response_model=ScanAccepted, tags=["scans"],
              responses={409: {"model": ErrorBody, "description": "Idempotency-Key reused "
                                                                  "with another body"},
                         429: _QUOTA_429})
    async def submit(body: ScanRequest, svc: Svc,
                     token: Annotated[ApiToken, Depends(scope("submit"))],
                     idempotency_key: Annotated[str | None, Header(
                         min_length=1, max_length=200,
                         description="the same key and body return the same job")] = None,
                     ) -> ScanAccepted:
        """Queue a scan: the job row, then its stream entry (docs/contract.md)."""
        problem = url_problem(body.url)
        if problem is not None:
            raise ApiError(422, "invalid_url", problem)
        body = _scheduling(svc, body, token)
        if body.callback_url is not None:
            await _check_callback(svc, body.callback_url)
        request_hash = hashlib.sha256(orjson.dumps(
            body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()
        sub = Submission(
            uuid.uuid4(), body.url, body.callback_url, body.metadata, body.mode,
            f"{token.name}:{idempotency_key}" if idempotency_key else None, request_hash,
            lane=None if body.lane == "default" else body.lane, tenant=body.tenant)
        try:
            got = await ops.submit_scan(svc.store, svc.consumer, sub,
                                        ops.max_queued(svc.settings, body.tenant))
        except QuotaExceeded as exc:
            # The message names the tenant, its queued count and limit, and the hint.
            raise ApiError(429, "quota_exceeded", str(exc),
                           {"Retry-After": str(exc.retry_after_s)}) from None
        if not got.created and got.request_hash != request_hash:
            raise ApiError(409, "conflict", "this Idempotency-Key was used with another "
                           f"request body (job {got.id})")
        return ScanAccepted(id=got.id, state=got.state)

    @app.get("/v1/scans/{scan_id}", response_model=ScanDetail, tags=["scans"],
             responses={404: {"model": ErrorBody, "description": "no such scan"}})
    async def get_scan(scan_id: uuid.UUID, svc: Svc,
                       _: Annotated[ApiToken, Depends(scope("read"))]) -> ScanDetail:
        """The job, its result and signals, its audit trail and its callback deliveries."""
        view = await svc.store.scan_view(scan_id)
        if view is None:
            raise ApiError(404, "not_found", f"no scan {scan_id}")
        for a in view["artifacts"]:
            a["href"] = f"/v1/scans/{scan_id}/artifacts/{a['kind']}"
        return ScanDetail.model_validate(view)

    @app.get("/v1/scans/{scan_id}/artifacts/{kind}", tags=["scans"], response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {},
                                          "text/plain": {}},
                              "description": "the screenshot (PNG/JPEG) or the DOM (text)"},
                        404: {"model": ErrorBody, "description": "no such scan or artifact"}})
    async def get_artifact(scan_id: uuid.UUID, kind: Kind, svc: Svc,
                           _: Annotated[ApiToken, Depends(scope("read"))]) -> Response:
        """A render scan's screenshot, full-page screenshot or DOM (a download, never a
        page)."""
        resp = await artifact_response(svc.store, scan_id, kind)
        if resp is None:
            raise ApiError(404, "not_found", f"scan {scan_id} has no {kind}")
        return resp

    @app.get("/v1/scans", response_model=ScanPage, tags=["scans"])
    async def list_scans(
            svc: Svc, _: Annotated[ApiToken, Depends(scope("read"))],
            state: State | None = None, verdict: Verdict | None = None,
            since: Annotated[datetime | None, Query(description="created at or after")] = None,
            url: Annotated[str | None, Query(max_length=8192, description="exact URL")] = None,
            lane: Annotated[str | None, Query(max_length=32)] = None,
            tenant: Annotated[str | None, Query(max_length=64)] = None,
            cursor: Annotated[str | None, Query(max_length=200)] = None,
            limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> ScanPage:
        """Scans newest first; follow `next_cursor` for older ones."""
        if since is not None and since.utcoffset() is None:
            raise ApiError(422, "invalid_request", "since: give a time zone "
                           "(e.g. 2026-11-23T10:00:00Z)")
        limit = min(limit, svc.api.api_page_max)
        rows = await svc.store.list_scans(
            state=state.value if state else None, verdict=verdict.value if verdict else None,
            since=since, url=url, after=_decode_cursor(cursor), limit=limit, lane=lane,
            tenant=tenant)
        items = [ScanSummary.model_validate(r) for r in rows]
        last = rows[-1] if len(rows) == limit else None
        return ScanPage(items=items, next_cursor=_encode_cursor(last["created_at"], last["id"])
                        if last else None)


def _scheduling(svc: Services, body: ScanRequest, token: ApiToken) -> ScanRequest:
    """The request's lane must be configured (LANES); a token bound to a tenant submits for
    that tenant: the body's tenant is filled in, or must match. Returns the body as submitted
    (with the tenant it counts against)."""
    lanes = svc.settings.lane_weights
    if body.lane is not None and body.lane not in lanes:
        raise ApiError(422, "invalid_lane", f"lane {body.lane!r} is not configured; the "
                       f"lanes are: {', '.join(lanes)}")
    if token.tenant is None:
        return body
    if body.tenant is not None and body.tenant != token.tenant:
        raise ApiError(403, "forbidden", f"token {token.name!r} submits for tenant "
                       f"{token.tenant!r} only (the body names {body.tenant!r})")
    return body.model_copy(update={"tenant": token.tenant})


async def _check_callback(svc: Services, url: str) -> None:
    """A callback URL gets the scan's address rules now (and again at each delivery)."""
    if not svc.api.callback_secret:
        raise ApiError(422, "callbacks_disabled", "this service has no CALLBACK_SECRET: "
                       "callbacks are off")
    try:
        async with asyncio.timeout(svc.api.callback_timeout_s):
            checked = await asyncio.to_thread(check_callback_url, url, svc.api.ports,
                                              svc.api.allow)
    except TimeoutError:
        return  # a slow resolver: like a name that does not resolve yet (checked at delivery)
    # A name that does not resolve yet may later; a refused address or bad URL never will.
    if not checked.ok and checked.code != netcheck.DNS_FAILED:
        raise ApiError(422, "invalid_callback_url", f"callback_url refused: {checked.reason}")


def _encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, jid = raw.partition("|")
        return datetime.fromisoformat(at), uuid.UUID(jid)
    except ValueError:
        raise ApiError(422, "invalid_request", "cursor: not a cursor from this API") from None


def _operator_routes(app: FastAPI) -> None:
    @app.post("/v1/scans/retry", response_model=RetryResult, tags=["operate"])
    async def retry(body: RetryRequest, svc: Svc,
                    token: Annotated[ApiToken, Depends(scope("operate"))]) -> RetryResult:
        """Re-queue FAILED / TIMED_OUT scans (with a fresh fault budget), by id or filter."""
        if not (body.ids or body.state or body.error_code or body.since):
            raise ApiError(422, "invalid_request",
                           "name ids or a filter (state, error_code, since)")
        done, skipped = await ops.retry_jobs(
            svc.store, svc.consumer, job_ids=body.ids, state=body.state,
            error_code=body.error_code, since=body.since, limit=body.limit,
            actor=f"api:{token.name}")
        return RetryResult(requeued=done, skipped=skipped)

    @app.get("/v1/dead-letters", response_model=DeadLetterPage, tags=["operate"])
    async def dead_letters(svc: Svc, _: Annotated[ApiToken, Depends(scope("read"))],
                           cursor: Annotated[str | None, Query(pattern=r"^\d+-\d+$")] = None,
                           limit: Annotated[int, Query(ge=1, le=1000)] = 100
                           ) -> DeadLetterPage:
        """Dead-lettered messages, oldest first, with their reason and original fields."""
        items = await ops.dlq_list(svc.consumer, limit, after=cursor)
        return DeadLetterPage(items=items, next_cursor=items[-1]["id"]
                              if len(items) == limit else None)

    @app.post("/v1/dead-letters/replay", response_model=ReplayResult, tags=["operate"])
    async def replay(body: ReplayRequest, svc: Svc,
                     token: Annotated[ApiToken, Depends(scope("operate"))]) -> ReplayResult:
        """Send entries back to the stream (their jobs re-queued with a fresh budget)."""
        n, problems = await ops.dlq_replay(svc.store, svc.consumer, body.ids,
                                           f"api:{token.name}")
        return ReplayResult(replayed=n, problems=problems)

    @app.delete("/v1/dead-letters", response_model=PurgeResult, tags=["operate"])
    async def purge(svc: Svc, _: Annotated[ApiToken, Depends(scope("operate"))],
                    id: Annotated[list[str], Query(
                        description="entry ids to delete (repeat the parameter)")] = [],  # noqa: B006
                    all: Annotated[bool, Query(
                        description="delete every entry (needed when no id is given)")] = False,
                    ) -> PurgeResult:
        """Delete dead letters: the named ids, or all of them with `all=true`."""
        bad = ops.bad_entry_ids(id)
        if bad:
            raise ApiError(422, "invalid_request", f"not stream entry ids: {', '.join(bad)}")
        if bool(id) == all:
            raise ApiError(422, "invalid_request",
                           "name entry ids (?id=...) or purge everything with ?all=true")
        return PurgeResult(purged=await ops.dlq_purge(svc.consumer, id, everything=all))

    @app.get("/v1/status", tags=["operate"])
    async def status(svc: Svc, _: Annotated[ApiToken, Depends(scope("read"))]
                     ) -> dict[str, Any]:
        """The fleet table of `safeurl-worker status`, as JSON."""
        return await ops.fleet_status(svc.store, svc.consumer.redis, svc.settings)
