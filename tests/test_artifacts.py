"""Unit tests for safeurl_worker.artifacts: a render report's big parts leave the stored report
as artifacts whose bytes, size and hash the worker measured itself. No services."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest
from pydantic import ValidationError

from safeurl_worker.artifacts import split
from safeurl_worker.models import Render, RenderImage, RenderRequest, Report

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 40


def image(data: bytes, type_: str = "image/png", **kw: object) -> RenderImage:
    return RenderImage.model_validate({"type": type_, "width": 1, "height": 1, "size": 999,
                                       "sha256": "0" * 64,
                                       "base64": base64.b64encode(data).decode(), **kw})


def render_report(**render: object) -> Report:
    return Report(fetcher_version="render-0.1.0", requested_url="http://a.test/",
                  http_status=200, render=Render.model_validate(render))


def test_artifacts_are_measured_here_and_stripped_from_the_stored_report() -> None:
    reqs = [RenderRequest(url="http://a.test/", type="document", navigation=True, status=200)]
    report = render_report(screenshot=image(PNG), full_page=image(JPEG, "image/jpeg"),
                           dom="<html><body>hi</body></html>", requests=reqs)
    stored, arts = split(report, 1 << 20)
    by_kind = {a.kind: a for a in arts}
    assert list(by_kind) == ["screenshot", "full_page", "dom", "requests"]
    shot = by_kind["screenshot"]
    # The image's own size and hash (999, zeros) are not believed: measured from the bytes.
    assert (shot.content_type, shot.data, shot.size) == ("image/png", PNG, len(PNG))
    assert shot.sha256 == hashlib.sha256(PNG).hexdigest()
    assert by_kind["full_page"].content_type == "image/jpeg"
    assert by_kind["dom"].data == b"<html><body>hi</body></html>"
    assert orjson.loads(by_kind["requests"].data)[0]["url"] == "http://a.test/"
    assert stored.render is not None
    assert stored.render.screenshot is not None and stored.render.screenshot.base64 is None
    assert stored.render.dom is None and stored.render.requests == []
    assert stored.render.stored_apart == ["screenshot", "full_page", "dom", "requests"]
    # What is stored is small and still a valid report (the result cache re-reads it).
    dumped = stored.model_dump(mode="json")
    assert base64.b64encode(PNG).decode() not in orjson.dumps(dumped).decode()
    assert len(orjson.dumps(dumped["render"])) < 2000
    assert Report.model_validate(dumped) == stored


def test_an_image_that_is_not_what_its_type_says_is_dropped() -> None:
    for bad in (image(b"<svg onload=alert(1)>"), image(PNG, "image/jpeg")):
        _, arts = split(render_report(screenshot=bad), 1 << 20)
        assert arts == []
    not_base64 = RenderImage(type="image/png", base64="%%%not base64%%%")
    assert split(render_report(screenshot=not_base64), 1 << 20)[1] == []


def test_an_artifact_over_the_cap_is_not_stored_and_counted() -> None:
    stored, arts = split(render_report(screenshot=image(PNG), dom="x" * 5000), 4096)
    assert [a.kind for a in arts] == ["screenshot"]
    assert stored.render is not None and stored.render.truncated == {"render.dom_stored": 1}


def test_a_static_report_is_unchanged() -> None:
    report = Report(fetcher_version="1", requested_url="http://a.test/")
    assert split(report, 4096) == (report, [])


def test_render_object_is_strict_and_bounded() -> None:
    with pytest.raises(ValidationError):
        Render.model_validate({"requests": [{"url": "http://a.test/"}] * 501})
    with pytest.raises(ValidationError):
        Render.model_validate({"surprise": 1})
    with pytest.raises(ValidationError):
        RenderImage.model_validate({"type": "text/html", "base64": ""})
