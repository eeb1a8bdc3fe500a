"""Extract the page features the worker scores, with html.parser (never executes anything).

Every list and string is bounded here to the limits of `safeurl_worker.models.Features`.
"""

from __future__ import annotations

import codecs
import re
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

MAX_URL = 8192
MAX_FORMS = 50
MAX_IFRAMES = 50
MAX_SCRIPTS = 50
MAX_JS_REDIRECTS = 20
MAX_TITLE = 1024
# Inline script text kept for the statistics; beyond this a page is scored on what was kept.
MAX_SCRIPT_TEXT = 4 * 1024 * 1024

_COUNTERS = {
    "eval_count": re.compile(r"\beval\s*\("),
    "atob_count": re.compile(r"\batob\s*\("),
    "unescape_count": re.compile(r"\bunescape\s*\("),
    "fromcharcode_count": re.compile(r"\bfromCharCode\b"),
    "document_write_count": re.compile(r"\bdocument\s*\.\s*write(?:ln)?\s*\("),
}
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")
_QUOTED = r"""(?P<q>['"`])(?P<url>[^'"`\r\n]{0,8192}?)(?P=q)"""
_JS_REDIRECTS = [
    # location = "..", location.href = "..", window/document/top/self.location(.href) = ".."
    re.compile(r"\blocation(?:\s*\.\s*href)?\s*=(?!=)\s*" + _QUOTED),
    # location.replace(".."), location.assign("..")
    re.compile(r"\blocation\s*\.\s*(?:replace|assign)\s*\(\s*" + _QUOTED),
]
_REFRESH_URL = re.compile(
    r"""^\s*(?P<delay>[\d.]*)\s*[;,]?\s*(?:url\s*=\s*)?(?P<u>.*)$""", re.I | re.S)


@dataclass
class PageFeatures:
    title: str | None = None
    forms: list[dict[str, Any]] = field(default_factory=list)
    iframes: list[dict[str, Any]] = field(default_factory=list)
    meta_refresh: str | None = None
    meta_refresh_delay: float = 0.0  # seconds; not part of the report
    js_redirects: list[str] = field(default_factory=list)
    external_scripts: list[str] = field(default_factory=list)
    scripts: dict[str, int] = field(default_factory=dict)
    links_count: int = 0

    def features(self) -> dict[str, Any]:
        """The report's `features` object."""
        return {
            "forms": self.forms[:MAX_FORMS],
            "iframes": self.iframes[:MAX_IFRAMES],
            "meta_refresh": self.meta_refresh,
            "js_redirects": self.js_redirects[:MAX_JS_REDIRECTS],
            "external_scripts": self.external_scripts[:MAX_SCRIPTS],
            "scripts": self.scripts,
            "links_count": self.links_count,
        }


def empty_features() -> dict[str, Any]:
    return PageFeatures(scripts=script_stats([], 0)).features()


def resolve(base: str, ref: str) -> str:
    """Absolute URL like a browser: whitespace trimmed, '\\' as '/', bounded length."""
    ref = ref.strip().replace("\t", "").replace("\n", "").replace("\r", "")
    scheme = ref.partition(":")[0].lower()
    if scheme in ("javascript", "data", "mailto", "tel", "about", "blob"):
        return ref[:MAX_URL]  # not resolvable; kept verbatim so the analysis sees it
    try:
        return urllib.parse.urljoin(base, ref.replace("\\", "/"))[:MAX_URL]
    except ValueError:  # e.g. a malformed IPv6 literal
        return ref[:MAX_URL]


def parse_refresh(content: str) -> tuple[float, str | None]:
    """Delay and URL of a `<meta http-equiv=refresh content="5; url='...'">` (URL may be None)."""
    m = _REFRESH_URL.match(content)
    if m is None:
        return 0.0, None
    try:
        delay = float(m.group("delay") or 0)
    except ValueError:
        delay = 0.0
    target = m.group("u").strip()
    if len(target) >= 2 and target[0] in "'\"" and target[-1] == target[0]:
        target = target[1:-1]
    elif target[:1] in ("'", '"'):
        target = target[1:].split(target[0], 1)[0]
    return delay, target.strip() or None


def _hidden_iframe(attrs: dict[str, str]) -> bool:
    if "hidden" in attrs:
        return True
    for dim in ("width", "height"):
        if attrs.get(dim, "").strip().lower().removesuffix("px").strip() in ("0", "1"):
            return True
    style = re.sub(r"\s+", "", attrs.get("style", "").lower())
    return "display:none" in style or "visibility:hidden" in style


def script_stats(texts: list[str], inline_count: int) -> dict[str, int]:
    joined = "\n".join(texts)
    stats = {name: len(rx.findall(joined)) for name, rx in _COUNTERS.items()}
    stats["inline_count"] = inline_count
    stats["long_base64_runs"] = len(_BASE64_RUN.findall(joined))
    stats["max_line_length"] = max((len(line) for line in joined.splitlines()), default=0)
    return stats


def js_redirects(texts: list[str], base: str) -> list[str]:
    """String-literal targets assigned to location; recorded only, never followed."""
    found: list[str] = []
    for text in texts:
        for rx in _JS_REDIRECTS:
            for m in rx.finditer(text):
                url = resolve(base, m.group("url"))
                if url not in found:
                    found.append(url)
                if len(found) >= MAX_JS_REDIRECTS:
                    return found
    return found


class _Scanner(HTMLParser):
    def __init__(self, base_url: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base = base_url
        self.base_seen = False
        self.page = PageFeatures()
        self.title_parts: list[str] | None = None
        self.title_done = False
        self.form: dict[str, Any] | None = None
        self.script_parts: list[str] | None = None
        self.scripts: list[str] = []
        self.script_chars = 0
        self.inline_count = 0

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        handler = getattr(self, f"_start_{tag}", None)
        if handler is not None:
            handler(attrs)

    def handle_startendtag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs_list)
        if tag in ("script", "title", "form"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.title_parts is not None:
            title = " ".join("".join(self.title_parts).split())
            self.page.title = title[:MAX_TITLE]
            self.title_parts, self.title_done = None, True
        elif tag == "form":
            self.form = None
        elif tag == "script" and self.script_parts is not None:
            self._end_script()

    def handle_data(self, data: str) -> None:
        if self.title_parts is not None:
            self.title_parts.append(data)
        if self.script_parts is not None and self.script_chars < MAX_SCRIPT_TEXT:
            self.script_parts.append(data)
            self.script_chars += len(data)

    def _end_script(self) -> None:
        if self.script_parts is not None:
            self.scripts.append("".join(self.script_parts))
        self.script_parts = None

    # --- tags -----------------------------------------------------------------------------

    def _start_base(self, attrs: dict[str, str]) -> None:
        if not self.base_seen and attrs.get("href"):  # only the first <base href> counts
            self.base, self.base_seen = resolve(self.base, attrs["href"]), True

    def _start_title(self, attrs: dict[str, str]) -> None:
        if not self.title_done and self.title_parts is None:
            self.title_parts = []

    def _start_form(self, attrs: dict[str, str]) -> None:
        self.form = {
            "action": resolve(self.base, attrs.get("action", "")),
            "method": (attrs.get("method", "get").strip().lower() or "get")[:16],
            "has_password": False,
        }
        if len(self.page.forms) < MAX_FORMS:
            self.page.forms.append(self.form)

    def _start_input(self, attrs: dict[str, str]) -> None:
        if self.form is not None and attrs.get("type", "").strip().lower() == "password":
            self.form["has_password"] = True

    def _start_iframe(self, attrs: dict[str, str]) -> None:
        src = resolve(self.base, attrs["src"]) if attrs.get("src") else "about:blank"
        if len(self.page.iframes) < MAX_IFRAMES:
            self.page.iframes.append({"src": src, "hidden": _hidden_iframe(attrs)})

    def _start_frame(self, attrs: dict[str, str]) -> None:
        self._start_iframe(attrs)

    def _start_meta(self, attrs: dict[str, str]) -> None:
        if attrs.get("http-equiv", "").strip().lower() != "refresh" or self.page.meta_refresh:
            return
        delay, target = parse_refresh(attrs.get("content", ""))
        if target:
            self.page.meta_refresh = resolve(self.base, target)
            self.page.meta_refresh_delay = delay

    def _start_script(self, attrs: dict[str, str]) -> None:
        if attrs.get("src"):
            src = resolve(self.base, attrs["src"])
            if src not in self.page.external_scripts and len(self.page.external_scripts) < 50:
                self.page.external_scripts.append(src)
            self.script_parts = None
        else:
            self.inline_count += 1
            self.script_parts = []

    def _start_a(self, attrs: dict[str, str]) -> None:
        if "href" in attrs:
            self.page.links_count += 1

    def _start_area(self, attrs: dict[str, str]) -> None:
        self._start_a(attrs)

    def finish(self) -> PageFeatures:
        self._end_script()  # a script cut off by the byte cap still counts
        if self.title_parts is not None:
            self.handle_endtag("title")
        self.page.scripts = script_stats(self.scripts, self.inline_count)
        self.page.js_redirects = js_redirects(self.scripts, self.base)
        return self.page


def scan_html(text: str, base_url: str) -> PageFeatures:
    """Features of an HTML document; URLs are resolved against `base_url` (or <base href>)."""
    scanner = _Scanner(base_url)
    try:
        scanner.feed(text)
        scanner.close()
    except (AssertionError, ValueError):  # html.parser can choke on hostile markup; keep the rest
        pass
    return scanner.finish()


def looks_like_html(content_type: str | None, body: bytes) -> bool:
    """html-ish by Content-Type, or sniffed when there is none (as browsers do)."""
    if content_type:
        return "html" in content_type.lower()
    head = body[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<script"))


def decode_body(body: bytes, content_type: str | None) -> str:
    """Decode with the charset from Content-Type or <meta charset>, falling back to UTF-8."""
    charset = _charset_from_type(content_type) or _charset_from_meta(body[:2048])
    for candidate in (charset, "utf-8"):
        if candidate and _is_text_codec(candidate):
            return body.decode(candidate, "replace")
    return body.decode("utf-8", "replace")


def _charset_from_type(content_type: str | None) -> str | None:
    m = re.search(r"charset\s*=\s*[\"']?([\w.:-]+)", content_type or "", re.I)
    return m.group(1) if m else None


def _charset_from_meta(head: bytes) -> str | None:
    m = re.search(rb"<meta[^>]+charset\s*=\s*[\"']?([\w.:-]+)", head, re.I)
    return m.group(1).decode("ascii", "replace") if m else None


def _is_text_codec(name: str) -> bool:
    try:
        info = codecs.lookup(name)
    except LookupError:
        return False
    # Refuse bytes-to-bytes codecs such as 'base64' or 'zlib' that a page could name.
    return bool(getattr(info, "_is_text_encoding", True))
