"""Request and response models of the HTTP API: the boundary is validated both ways."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ..config import TENANT_PATTERN
from ..models import MAX_URL, State, Verdict, storable
from ..ops import bad_entry_ids

Mode = Literal["static", "render"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScanRequest(_In):
    url: str = Field(min_length=1, max_length=MAX_URL)
    mode: Mode | None = None
    callback_url: str | None = Field(default=None, min_length=1, max_length=2048)
    metadata: dict[str, Any] | None = None  # echoed in the callback; bounded by the body limit
    # One of the configured LANES (checked by the route: the list is the worker's settings).
    lane: str | None = Field(default=None, max_length=32)
    tenant: str | None = None  # whose quota and fair share the scan counts against

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str | None:
        if v is not None and not re.match(TENANT_PATTERN, v):
            raise ValueError("a tenant is 1-64 letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")
        return v

    @field_validator("metadata")
    @classmethod
    def _storable(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # jsonb refuses NUL and lone surrogates: clean them as the report model does.
        return None if v is None else dict(storable(v))


class ScanAccepted(BaseModel):
    id: uuid.UUID
    state: State


def _lane_or_default(v: Any) -> Any:
    return "default" if v is None else v


# A job's lane as shown: the rows say NULL for the default lane (and rows of another API service
# have none); the API always names it.
EffectiveLane = Annotated[str, BeforeValidator(_lane_or_default)]


class ErrorBody(BaseModel):
    error: str  # a stable code: unauthorized, forbidden, not_found, conflict, invalid_request...
    message: str
    detail: list[dict[str, Any]] | None = None


class JobOut(BaseModel):
    id: uuid.UUID
    url: str
    state: State
    version: int
    attempts: int
    faults: int
    mode: str | None = None
    lane: EffectiveLane = "default"
    tenant: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    callback_url: str | None = None
    metadata: dict[str, Any] | None = None
    # Nullable: tables the API service created first may allow NULL here.
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ResultOut(BaseModel):
    verdict: Verdict
    score: int
    confidence: float | None = None
    http_status: int | None = None
    final_url: str | None = None
    redirects: list[dict[str, Any]] | None = None
    content_type: str | None = None
    sha256: str | None = None
    title: str | None = None
    signals: list[dict[str, Any]] | None = None
    analyzer_version: str | None = None
    cached_from: uuid.UUID | None = None
    created_at: datetime | None = None


class AuditOut(BaseModel):
    from_state: str | None
    to_state: str
    version: int
    worker_id: str | None
    at: datetime
    detail: dict[str, Any] | None


class DeliveryOut(BaseModel):
    attempt: int
    at: datetime
    http_status: int | None
    error: str | None
    duration_ms: int | None


class CallbackOut(BaseModel):
    id: int
    version: int
    state: str
    url: str
    status: Literal["PENDING", "DELIVERED", "FAILED", "REFUSED"]
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    deliveries: list[DeliveryOut]


class ArtifactOut(BaseModel):
    kind: Literal["screenshot", "full_page", "dom"]
    type: str | None  # the image's MIME type; the DOM is served as text/plain
    size: int | None  # bytes
    href: str  # GET it (read scope)


class ScanDetail(BaseModel):
    job: JobOut
    result: ResultOut | None
    audit: list[AuditOut]
    callbacks: list[CallbackOut]
    artifacts: list[ArtifactOut]  # a render scan's screenshot, full page and DOM, when kept


class ScanSummary(BaseModel):
    id: uuid.UUID
    url: str
    state: State
    error_code: str | None
    mode: str | None
    lane: EffectiveLane = "default"
    tenant: str | None = None
    verdict: Verdict | None
    score: int | None
    created_at: datetime | None
    finished_at: datetime | None


class ScanPage(BaseModel):
    items: list[ScanSummary]
    next_cursor: str | None  # pass as `cursor` for the next page; None on the last page


class RetryRequest(_In):
    ids: list[uuid.UUID] = Field(default=[], max_length=10_000)
    state: Literal["FAILED", "TIMED_OUT"] | None = None
    error_code: str | None = Field(default=None, pattern=r"^[A-Z][A-Z0-9_]{0,63}$")
    since: datetime | None = None  # finished at or after
    limit: int = Field(default=1000, ge=1, le=10_000)

    @field_validator("since")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.utcoffset() is None:
            raise ValueError("give a time zone (e.g. 2026-11-23T10:00:00Z)")
        return v


class RetryResult(BaseModel):
    requeued: int
    skipped: int


class ReplayRequest(_In):
    ids: list[str] = Field(min_length=1, max_length=10_000)

    @field_validator("ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        bad = bad_entry_ids(v)
        if bad:
            raise ValueError(f"not stream entry ids: {', '.join(bad[:10])}")
        return v


class ReplayResult(BaseModel):
    replayed: int
    problems: list[str]


class PurgeResult(BaseModel):
    purged: int


class DeadLetterPage(BaseModel):
    items: list[dict[str, str]]  # the entry's fields plus `id`, `reason`, `job_id`...
    next_cursor: str | None
