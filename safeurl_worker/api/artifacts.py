"""Serving a render scan's artifacts (screenshot, full-page screenshot, DOM) from its stored
report, for the API and the console alike.

They are the scanned site's content, possibly hostile: images go out only as PNG or JPEG, the
DOM only as a plain-text download, all with `nosniff` and a sandboxing CSP, so nothing of it
can ever run on the service's own origin.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Literal

from fastapi.responses import Response

from ..store import Store

Kind = Literal["screenshot", "full_page", "dom"]
_IMAGE_TYPES = ("image/png", "image/jpeg")
_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600",
            "Content-Security-Policy": "sandbox; default-src 'none'"}


async def artifact_response(store: Store, scan_id: uuid.UUID, kind: Kind) -> Response | None:
    """The artifact as an HTTP response, or None when the scan has no such artifact."""
    found = await store.artifact(scan_id, kind)
    if isinstance(found, str) and kind == "dom":
        return Response(found.encode(), media_type="text/plain; charset=utf-8", headers={
            **_HEADERS, "Content-Disposition": f'attachment; filename="{scan_id}-dom.html.txt"'})
    if not isinstance(found, dict) or found.get("type") not in _IMAGE_TYPES:
        return None
    try:
        data = base64.b64decode(str(found.get("base64", "")), validate=True)
    except (binascii.Error, ValueError):
        return None
    return Response(data, media_type=str(found["type"]), headers=_HEADERS)
