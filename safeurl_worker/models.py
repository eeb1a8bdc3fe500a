"""Pydantic models for every boundary: the stream message, the container report, job rows.

The container report is untrusted input (it is produced next to hostile content), so the model is
strict: unknown keys are rejected, every string and list is bounded.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Form(_Strict):
    action: Url  # absolute URL the form submits to
    method: Annotated[str, StringConstraints(max_length=16)] = "get"
    has_password: bool = False


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


class Features(_Strict):
    """What the fetcher saw in the page; the worker scores these (see analysis.py)."""

    forms: Annotated[list[Form], Field(max_length=50)] = []
    iframes: Annotated[list[Iframe], Field(max_length=50)] = []
    meta_refresh: Url | None = None
    js_redirects: Annotated[list[Url], Field(max_length=20)] = []
    external_scripts: Annotated[list[Url], Field(max_length=50)] = []
    scripts: ScriptStats = ScriptStats()
    links_count: int = Field(default=0, ge=0)


class Timings(_Strict):
    dns_ms: float | None = Field(default=None, ge=0)
    connect_ms: float | None = Field(default=None, ge=0)
    total_ms: float = Field(default=0, ge=0)


class Report(_Strict):
    """The one JSON object the fetcher prints on stdout."""

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

    def signals_json(self) -> list[dict[str, Any]]:
        return [s.model_dump() for s in self.signals]
