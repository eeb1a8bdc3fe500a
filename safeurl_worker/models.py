"""Pydantic models for every boundary: the stream message, the container report, job rows.

The container report is untrusted input (it is produced next to hostile content), so the model is
strict: unknown keys are rejected, every string and list is bounded, and every string is made
storable (no NUL, no lone surrogate) before it is checked.
"""

from __future__ import annotations

import enum
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_URL = 8192
Url = Annotated[str, StringConstraints(max_length=MAX_URL)]
ShortText = Annotated[str, StringConstraints(max_length=2048)]
Code = Annotated[str, StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")]


class State(enum.StrEnum):
    QUEUED = "QUEUED"
    FETCHING = "FETCHING"
    ANALYZING = "ANALYZING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.TIMED_OUT})


class Verdict(enum.StrEnum):
    SAFE = "safe"
    SUSPICIOUS = "suspicious"
    MALICIOUS = "malicious"
    UNKNOWN = "unknown"


class StreamMessage(BaseModel):
    """One entry of the `scan-jobs` stream. Only `job_id` matters; extra fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: uuid.UUID


# --- the container report -------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(s: str) -> str:
    """`s` without NUL (PostgreSQL rejects it in text and as \\u0000 in jsonb) and with every
    lone surrogate (JSON may escape one; UTF-8, hence PostgreSQL and orjson, cannot encode it)
    replaced by U+FFFD."""
    if "\x00" in s:
        s = s.replace("\x00", "")
    if not s.isascii():
        s = _SURROGATE.sub("\ufffd", s)
    return s


def storable(value: Any) -> Any:
    """`storable_text` applied to every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value  # numbers, bools, None, and models (already validated, hence clean)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Before the field constraints run, so the bounds apply to what will be stored. On the base
    # class so a part validated on its own is clean too; nested parts are re-walked, which
    # costs little next to a container run.
    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        return storable(data)


class ReportError(_Strict):
    code: Code
    message: ShortText = ""


class RedirectHop(_Strict):
    url: Url  # the URL that answered with the redirect
    status: int | None = Field(default=None, ge=100, le=599)  # None for a meta refresh
    location: Url  # where it pointed, resolved against `url`
    kind: Literal["http", "meta"] = "http"


class TlsInfo(_Strict):
    verified: bool
    version: Annotated[str, StringConstraints(max_length=32)] | None = None
    error: ShortText | None = None


Label = Annotated[str, StringConstraints(max_length=256)]  # a short piece of page text


class Form(_Strict):
    action: Url  # absolute URL the form submits to
    method: Annotated[str, StringConstraints(max_length=16)] = "get"
    has_password: bool = False
    # What the form asks for (from input type, name, id, autocomplete, placeholder, label);
    # inputs that belong to it through `form=` count too.
    has_email: bool = False  # an e-mail address or a user name
    has_card: bool = False  # a payment card number, expiry or CVC
    has_otp: bool = False  # a one-time code
    text: Label = ""  # its visible words: labels, placeholders, button text (collapsed, cut)


class Iframe(_Strict):
    src: Url
    hidden: bool = False


class ScriptStats(_Strict):
    inline_count: int = Field(default=0, ge=0)
    eval_count: int = Field(default=0, ge=0)
    atob_count: int = Field(default=0, ge=0)
    unescape_count: int = Field(default=0, ge=0)
    fromcharcode_count: int = Field(default=0, ge=0)
    document_write_count: int = Field(default=0, ge=0)
    long_base64_runs: int = Field(default=0, ge=0)  # runs of >= 200 base64 characters
    max_line_length: int = Field(default=0, ge=0)


class Image(_Strict):
    src: Url  # absolute
    alt: Label = ""


class PageMeta(_Strict):
    """How the page names itself to link previews and search engines."""

    og_site_name: Label | None = None
    og_title: Label | None = None
    og_url: Url | None = None
    og_image: Url | None = None
    canonical: Url | None = None
    application_name: Label | None = None
    description: Label | None = None


class Features(_Strict):
    """What the fetcher saw in the page; the worker scores these (see analysis.py)."""

    # How far the page was understood: "full" (parsed to the end), "partial" (a parse bound
    # was reached; the features cover what was parsed), "none" (not HTML, or nothing to parse).
    parse: Literal["full", "partial", "none"] = "none"
    parse_problem: ShortText | None = None  # why the parse was partial, when it was

    forms: Annotated[list[Form], Field(max_length=50)] = []
    iframes: Annotated[list[Iframe], Field(max_length=50)] = []
    meta_refresh: Url | None = None
    js_redirects: Annotated[list[Url], Field(max_length=20)] = []
    external_scripts: Annotated[list[Url], Field(max_length=50)] = []
    scripts: ScriptStats = ScriptStats()
    links_count: int = Field(default=0, ge=0)
    # What the page presents itself as (brand impersonation reads these).
    headings: Annotated[list[Label], Field(max_length=20)] = []  # h1-h3 text, in page order
    meta: PageMeta = PageMeta()
    icons: Annotated[list[Url], Field(max_length=10)] = []  # <link rel=icon|apple-touch-icon>
    images: Annotated[list[Image], Field(max_length=50)] = []
    stylesheets: Annotated[list[Url], Field(max_length=50)] = []  # absolute
    buttons: Annotated[list[Label], Field(max_length=20)] = []  # button/submit text, anywhere
    text: Annotated[str, StringConstraints(max_length=4096)] = ""  # visible text, collapsed


class Timings(_Strict):
    dns_ms: float | None = Field(default=None, ge=0)
    connect_ms: float | None = Field(default=None, ge=0)
    total_ms: float = Field(default=0, ge=0)


# --- what only a browser sees (the browser image's `render` object, render/report.py) -------
# Bounds follow the image's own (render/browse.py, render/proxy.py) with room to spare; a report
# past them is OUTPUT_INVALID. Sizes, hashes and types the image states about its artifacts are
# not trusted: the worker decodes and measures them itself (artifacts.py).

Text = Annotated[str, StringConstraints(max_length=1024)]
Tiny = Annotated[str, StringConstraints(max_length=64)]
Ms = Annotated[float, Field(ge=0)]
MAX_ARTIFACT_B64 = 64 * 1024 * 1024  # beyond any BROWSER_OUTPUT_MAX_BYTES (le=64 MiB)


class RenderImage(_Strict):
    type: Literal["image/png", "image/jpeg", "image/webp"]
    width: int | None = Field(default=None, ge=0)
    height: int | None = Field(default=None, ge=0)
    size: int = Field(default=0, ge=0)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    base64: Annotated[str, StringConstraints(max_length=MAX_ARTIFACT_B64)] | None = None


class RenderHop(_Strict):
    url: Url
    location: Url
    status: int | None = None
    kind: Tiny  # http, meta, script, form, link, reload, other
    at_ms: Ms | None = None


class Initiator(_Strict):
    type: Tiny = ""
    url: Url | None = None


class RenderRequest(_Strict):
    url: Url
    method: Annotated[str, StringConstraints(max_length=16)] = "GET"
    type: Tiny = ""  # document, script, image, stylesheet, xhr, fetch, websocket, ...
    navigation: bool = False  # a main-frame navigation
    status: int | None = None
    remote_address: Tiny | None = None
    size: int | None = None
    start_ms: Ms | None = None
    duration_ms: float | None = None
    initiator: Initiator | None = None
    error: Text | None = None
    refused: Text | None = None  # why the egress proxy refused it (never sent)
    redirected_from: Url | None = None


class Refusal(_Strict):
    url: Url  # absolute URL, or host:port for a tunnel
    method: Annotated[str, StringConstraints(max_length=16)] = ""
    code: Code
    reason: Text = ""
    at_ms: Ms | None = None


class RenderWebSocket(_Strict):
    url: Url
    error: Text | None = None
    frames_sent: int = Field(default=0, ge=0)
    frames_received: int = Field(default=0, ge=0)
    refused: Text | None = None


class ConsoleLine(_Strict):
    type: Annotated[str, StringConstraints(max_length=16)] = ""
    text: Text = ""
    url: Text | None = None


class Cookie(_Strict):
    name: Label = ""
    value: Label = ""
    domain: Label = ""
    path: Label = ""
    expires: float | None = None
    http_only: bool = False
    secure: bool = False
    same_site: Annotated[str, StringConstraints(max_length=16)] = ""


class Download(_Strict):
    url: Url
    filename: Label = ""
    size: int | None = Field(default=None, ge=0)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    error: Text | None = None


class Certificate(_Strict):
    subject: Text = ""
    issuer: Text = ""
    sans: Annotated[list[Label], Field(max_length=100)] = []
    not_before: Tiny | float | None = None
    not_after: Tiny | float | None = None
    age_days: float | None = None
    serial: Annotated[str, StringConstraints(max_length=128)] | None = None
    version: Tiny | None = None
    error: Text | None = None


class Favicon(_Strict):
    url: Url
    status: int | None = None
    mmh3: int | None = None  # Shodan's http.favicon.hash
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    size: int = Field(default=0, ge=0)
    error: Text | None = None


class ProxyTarget(_Strict):
    target: Url
    address: Tiny | None = None
    bytes_in: int = Field(default=0, ge=0)


class ProxyStats(_Strict):
    connections: int = Field(default=0, ge=0)
    bytes_in: int = Field(default=0, ge=0)
    targets: Annotated[list[ProxyTarget], Field(max_length=100)] = []


class Render(_Strict):
    """What the browser image adds to the fetcher's report (`report.render`)."""

    browser: Tiny | None = None
    phases: Annotated[dict[Tiny, float], Field(max_length=16)] = {}
    navigation: Annotated[list[RenderHop], Field(max_length=500)] = []
    requests: Annotated[list[RenderRequest], Field(max_length=500)] = []
    refused: Annotated[list[Refusal], Field(max_length=500)] = []
    websockets: Annotated[list[RenderWebSocket], Field(max_length=50)] = []
    console: Annotated[list[ConsoleLine], Field(max_length=100)] = []
    page_errors: Annotated[list[Text], Field(max_length=50)] = []
    cookies: Annotated[list[Cookie], Field(max_length=100)] = []
    downloads: Annotated[list[Download], Field(max_length=10)] = []
    certificate: Certificate | None = None
    favicon: Favicon | None = None
    proxy: ProxyStats = ProxyStats()
    screenshot: RenderImage | None = None
    full_page: RenderImage | None = None
    screenshot_problem: Text | None = None
    dom: Annotated[str, StringConstraints(max_length=MAX_ARTIFACT_B64)] | None = None
    dom_size: int = Field(default=0, ge=0)
    dom_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    dom_truncated: bool = False
    truncated: Annotated[dict[Tiny, Annotated[int, Field(ge=0)]], Field(max_length=64)] = {}
    # Set by the worker, never by the image: the parts moved out of the stored report into
    # `scan_artifacts` (screenshot, full_page, dom, requests).
    stored_apart: Annotated[list[Tiny], Field(max_length=8)] = []


class Report(_Strict):
    """The one JSON object the fetcher prints on stdout (the browser image: plus `render`)."""

    schema_version: Literal[1] = 1
    fetcher_version: Annotated[str, StringConstraints(max_length=32)]
    requested_url: Url
    final_url: Url | None = None
    redirects: Annotated[list[RedirectHop], Field(max_length=20)] = []
    http_status: int | None = Field(default=None, ge=100, le=599)
    headers: Annotated[dict[Annotated[str, StringConstraints(max_length=128)], ShortText],
                       Field(max_length=100)] = {}
    content_type: Annotated[str, StringConstraints(max_length=256)] | None = None
    body_size: int = Field(default=0, ge=0)
    body_truncated: bool = False
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    title: Annotated[str, StringConstraints(max_length=1024)] | None = None
    resolved_addresses: Annotated[list[Annotated[str, StringConstraints(max_length=64)]],
                                  Field(max_length=32)] = []
    connected_address: Annotated[str, StringConstraints(max_length=64)] | None = None
    tls: TlsInfo | None = None
    features: Features = Features()
    timings: Timings = Timings()
    error: ReportError | None = None
    # Items left out so the report fits the stdout cap or a list bound, per part
    # (`{"features.images": 41, "headers": 3}`): a cut is visible, never OUTPUT_INVALID.
    truncated: Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                              Annotated[int, Field(ge=0)]], Field(max_length=32)] = {}
    render: Render | None = None  # a render scan's browser view (the browser image only)


# --- rows -----------------------------------------------------------------------------------


class Job(BaseModel):
    """A `scan_jobs` row as the worker sees it."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    url: str
    state: State
    version: int
    attempts: int
    worker_id: str | None = None
    error_code: str | None = None
    created_at: datetime | None = None
    owner_token: str | None = None  # the process life of `worker_id` that owns the job
    faults: int = 0  # failures caused by the job itself (see docs/contract.md)
    mode: str | None = None  # `static` / `render` (scan_jobs.mode); None: SCAN_MODE
    lane: str | None = None  # scan_jobs.lane; None: the default lane (the plain SCAN_STREAM)
    tenant: str | None = None  # scan_jobs.tenant; None: no tenant (no quota)


class Signal(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    weight: int
    evidence: str


class Analysis(BaseModel):
    model_config = ConfigDict(frozen=True)

    verdict: Verdict
    score: int = Field(ge=0, le=100)
    signals: list[Signal]
    analyzer_version: str
    # How much of the page the verdict rests on (0..1): low when the page could not be parsed
    # or nothing was seen in it (see docs/analysis.md). 1.0 for results scored before it existed.
    confidence: float = Field(default=1.0, ge=0, le=1)

    def signals_json(self) -> list[dict[str, Any]]:
        return [s.model_dump() for s in self.signals]
