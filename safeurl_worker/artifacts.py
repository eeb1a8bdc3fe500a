"""A render scan's artifacts: the big parts of its report, kept apart from the result row.

The browser image puts the viewport screenshot, the full-page screenshot and the DOM into its
report (base64 / text) and the request log into `render.requests`. `split` takes them out: each
becomes an `Artifact` (bytes, content type, size and sha256 measured here - the image's own
figures are not trusted), stored in `scan_artifacts` by the completing statement
(`Store.complete`), and the report that goes into `scan_results.report` keeps only the small
parts (the row stays small: the console and the API list jobs by it). An image whose bytes are
not what its type says is dropped, never stored under a type it is not.

Kinds: `screenshot` and `full_page` (image/png or image/jpeg), `dom` (text/html, the scanned
site's markup: never served as a page), `requests` (application/json, the request log).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from functools import cached_property

import orjson

from .models import Render, RenderImage, Report

KINDS = ("screenshot", "full_page", "dom", "requests")
_MAGIC = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",),
          "image/webp": (b"RIFF",)}


@dataclasses.dataclass(frozen=True)
class Artifact:
    kind: str
    content_type: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _image(kind: str, image: RenderImage | None, cap: int) -> Artifact | None:
    if image is None or not image.base64:
        return None
    try:
        data = base64.b64decode(image.base64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(data) > cap or not data.startswith(_MAGIC[image.type]):
        return None
    return Artifact(kind, image.type, data)


def split(report: Report, cap: int) -> tuple[Report, list[Artifact]]:
    """(the report to store, its artifacts). Each artifact is at most `cap` bytes (a bigger one
    is dropped and counted in `render.truncated`). A report without `render` is unchanged."""
    render = report.render
    if render is None:
        return report, []
    found: list[Artifact | None] = [
        _image("screenshot", render.screenshot, cap),
        _image("full_page", render.full_page, cap),
        Artifact("dom", "text/html", render.dom.encode()) if render.dom is not None else None,
        Artifact("requests", "application/json",
                 orjson.dumps([r.model_dump(mode="json") for r in render.requests]))
        if render.requests else None,
    ]
    kept = [a for a in found if a is not None and a.size <= cap]
    dropped = {f"render.{a.kind}_stored": 1 for a in found if a is not None and a.size > cap}
    stripped: Render = render.model_copy(update={
        "screenshot": _without_bytes(render.screenshot),
        "full_page": _without_bytes(render.full_page),
        "dom": None, "requests": [] if any(a.kind == "requests" for a in kept)
        else render.requests,
        "stored_apart": [a.kind for a in kept],
        "truncated": {**render.truncated, **dropped}})
    return report.model_copy(update={"render": stripped}), kept


def _without_bytes(image: RenderImage | None) -> RenderImage | None:
    return None if image is None else image.model_copy(update={"base64": None})
