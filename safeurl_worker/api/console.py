"""The web console at `/`: server-rendered pages (Jinja2) over the same operations as the API.

Login takes an API token once; the browser then holds only a session cookie (HttpOnly,
SameSite=Strict) naming the token and its expiry, signed with a key derived from the server's
API_SESSION_SECRET and the token's configured hash: any replica can check it, removing the token
from API_TOKENS ends its sessions, and the hashes in API_TOKENS alone cannot forge one (they are
configuration, not secrets). The token itself never reaches a page or a cookie. Every form
carries a CSRF field: derived from the session once logged in, and a double-submit cookie on
the login form (so another site cannot log a browser into its own token); the cookies are
SameSite=Strict besides. Pages are sent with a CSP that allows only their own nonce'd script
and no framing. A little plain `fetch` refreshes a running scan's page; everything works
without JavaScript too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from .. import ops
from ..models import State, Verdict
from .artifacts import Kind, artifact_response
from .config import ApiToken, find_token

COOKIE = "safeurl_session"
LOGIN_COOKIE = "safeurl_login"  # the login form's double-submit CSRF value
SESSION_S = 8 * 3600
_templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
# No framing (clickjacking of the buttons), scripts only with this response's nonce, forms
# only to us. Styles are inline in the templates.
_CSP = ("default-src 'self'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _mac(key: bytes, token: ApiToken, text: str) -> str:
    # Keyed by the server's secret AND the token's hash: both are needed to forge a session.
    per_token = hmac.new(key, bytes.fromhex(token.sha256), hashlib.sha256).digest()
    return hmac.new(per_token, text.encode(), hashlib.sha256).hexdigest()


def session_value(key: bytes, token: ApiToken, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_S)
    return f"{token.name}.{expires}.{_mac(key, token, f'session|{token.name}|{expires}')}"


def session_token(key: bytes, tokens: list[ApiToken], value: str | None,
                  now: float | None = None) -> ApiToken | None:
    """The token a session cookie stands for, if the cookie is genuine and unexpired."""
    if not value or value.count(".") != 2:
        return None
    name, expires, mac = value.split(".")
    token = next((t for t in tokens if t.name == name), None)
    if token is None or not expires.isdigit() or int(expires) < (now or time.time()):
        return None
    ok = hmac.compare_digest(mac, _mac(key, token, f"session|{name}|{expires}"))
    return token if ok else None


def csrf_for(key: bytes, token: ApiToken, session: str) -> str:
    return _mac(key, token, f"csrf|{session}")


class _LoginNeeded(Exception):
    pass


class Viewer:
    """The logged-in token, and what the page may offer it."""

    def __init__(self, key: bytes, token: ApiToken, session: str) -> None:
        self.token = token
        self.csrf = csrf_for(key, token, session)
        self.can_operate = "operate" in token.scopes

    def check_csrf(self, presented: str) -> None:
        if not hmac.compare_digest(self.csrf, presented):
            raise _Forbidden("the form is stale or not ours (CSRF check failed): reload the page")

    def require_operate(self) -> None:
        if not self.can_operate:
            raise _Forbidden(f"token {self.token.name!r} lacks the 'operate' scope")


class _Forbidden(Exception):
    pass


def _viewer(request: Request) -> Viewer:
    svc = request.app.state.services
    value = request.cookies.get(COOKIE)
    token = session_token(svc.session_key, svc.tokens, value)
    if token is None or value is None or "read" not in token.scopes:
        raise _LoginNeeded
    return Viewer(svc.session_key, token, value)


V = Annotated[Viewer, Depends(_viewer)]


def _page(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    resp = _templates.TemplateResponse(request, name, {**context, "nonce": nonce},
                                       status_code=code)
    resp.headers.update({"Content-Security-Policy": _CSP.format(nonce=nonce),
                         "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                         "Referrer-Policy": "same-origin", "Cache-Control": "no-store"})
    return resp


def add_console(app: FastAPI) -> None:
    @app.exception_handler(_LoginNeeded)
    async def login_needed(request: Request, _: _LoginNeeded) -> Response:
        target = quote(request.url.path, safe="/")
        return RedirectResponse(f"/login?next={target}", status_code=303)

    @app.exception_handler(_Forbidden)
    async def forbidden(request: Request, exc: _Forbidden) -> Response:
        return _page(request, "error.html", 403, viewer=None, message=str(exc))

    _auth_pages(app)
    _pages(app)
    _actions(app)


def _safe_next(target: str) -> str:
    # Only a path of ours: never an open redirect to another site.
    ok = target.startswith("/") and not target.startswith(("//", "/\\")) and "\\" not in target
    return target if ok else "/"


def _secure(request: Request) -> bool:
    # Behind a TLS-terminating proxy the request we see is http: API_SECURE_COOKIES says so.
    return request.url.scheme == "https" or bool(
        request.app.state.services.api.api_secure_cookies)


def _login_page(request: Request, next: str, code: int = 200, error: str | None = None
                ) -> Response:
    """The login form, with a fresh double-submit value in its cookie and its field."""
    nonce = secrets.token_urlsafe(32)
    resp = _page(request, "login.html", code, viewer=None, next=_safe_next(next), error=error,
                 login_csrf=nonce)
    resp.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict",
                    secure=_secure(request), path="/login")
    return resp


def _auth_pages(app: FastAPI) -> None:
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(request: Request, next: str = "/") -> Response:
        return _login_page(request, next)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request, token: Annotated[str, Form(max_length=512)],
                    csrf: Annotated[str, Form(max_length=100)] = "",
                    next: Annotated[str, Form(max_length=2048)] = "/") -> Response:
        # A login form posted from another site carries no cookie of ours (SameSite=Strict)
        # and cannot read the one we set: a mismatch is a forged or stale form.
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie, csrf):
            return _login_page(request, next, 403, "the form was stale: log in again")
        svc = request.app.state.services
        found = find_token(svc.tokens, token.strip())
        if found is None or "read" not in found.scopes:
            why = "unknown token" if found is None else "this token lacks the 'read' scope"
            return _login_page(request, next, 401, why)
        resp = RedirectResponse(_safe_next(next), status_code=303)
        resp.set_cookie(COOKIE, session_value(svc.session_key, found), max_age=SESSION_S,
                        httponly=True, samesite="strict", secure=_secure(request),
                        path="/")
        resp.delete_cookie(LOGIN_COOKIE, path="/login")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(viewer: V, csrf: Annotated[str, Form()]) -> Response:
        viewer.check_csrf(csrf)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp


def _pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home(request: Request, viewer: V,
                   state: Annotated[State | None, Query()] = None,
                   verdict: Annotated[Verdict | None, Query()] = None) -> Response:
        svc = request.app.state.services
        status = await ops.fleet_status(svc.store, svc.consumer.redis, svc.settings)
        scans = await svc.store.list_scans(
            state=state.value if state else None, verdict=verdict.value if verdict else None,
            since=None, url=None, after=None, limit=50)
        return _page(request, "home.html", viewer=viewer, status=status, scans=scans,
                     state=state.value if state else "", verdict=verdict.value if verdict else "",
                     states=[s.value for s in State], verdicts=[v.value for v in Verdict])

    @app.get("/scans/{scan_id}", response_class=HTMLResponse, include_in_schema=False)
    async def scan_page(request: Request, scan_id: uuid.UUID, viewer: V) -> Response:
        view = await request.app.state.services.store.scan_view(scan_id)
        if view is None:
            return _page(request, "error.html", 404, viewer=viewer,
                         message=f"no scan {scan_id}")
        terminal = State(view["job"]["state"]).terminal
        return _page(request, "scan.html", viewer=viewer, v=view, terminal=terminal)

    @app.get("/scans/{scan_id}/artifacts/{kind}", include_in_schema=False)
    async def artifact(request: Request, scan_id: uuid.UUID, kind: Kind, _: V) -> Response:
        resp = await artifact_response(request.app.state.services.store, scan_id, kind)
        return resp or Response("no such artifact", status_code=404, media_type="text/plain")

    @app.get("/dead-letters", response_class=HTMLResponse, include_in_schema=False)
    async def dead_letters(request: Request, viewer: V) -> Response:
        items = await ops.dlq_list(request.app.state.services.consumer, 200)
        return _page(request, "dead_letters.html", viewer=viewer, items=items,
                     message=request.query_params.get("message"))


def _actions(app: FastAPI) -> None:
    @app.post("/scans/{scan_id}/retry", include_in_schema=False)
    async def retry(request: Request, scan_id: uuid.UUID, viewer: V,
                    csrf: Annotated[str, Form()]) -> Response:
        viewer.check_csrf(csrf)
        viewer.require_operate()
        svc = request.app.state.services
        await ops.retry_jobs(svc.store, svc.consumer, job_ids=[scan_id], state=None,
                             error_code=None, since=None, limit=1,
                             actor=f"console:{viewer.token.name}")
        return RedirectResponse(f"/scans/{scan_id}", status_code=303)

    @app.post("/dead-letters/replay", include_in_schema=False)
    async def replay(request: Request, viewer: V, csrf: Annotated[str, Form()],
                     entry: Annotated[str, Form(pattern=r"^\d+-\d+$")]) -> Response:
        viewer.check_csrf(csrf)
        viewer.require_operate()
        svc = request.app.state.services
        found = await ops.dlq_entry(svc.consumer, entry)
        n, problems = await ops.dlq_replay(svc.store, svc.consumer, [entry],
                                           f"console:{viewer.token.name}")
        if n and found is not None and found.get("job_id"):  # watch it run
            return RedirectResponse(f"/scans/{found['job_id']}", status_code=303)
        message = quote("; ".join(problems) or "nothing replayed")
        return RedirectResponse(f"/dead-letters?message={message}", status_code=303)
