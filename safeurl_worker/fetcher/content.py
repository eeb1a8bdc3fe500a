"""From response bytes to the text a browser would parse: Content-Encoding, MIME sniffing and
character encoding, each the way browsers do it (the WHATWG Fetch, MIME Sniffing, HTML and
Encoding standards), because a page that decodes differently for us than for a browser is a page
we cannot see.
"""

from __future__ import annotations

import codecs
import re
import zlib
from dataclasses import dataclass

import webencodings

# --- Content-Encoding -----------------------------------------------------------------------

# Brotli and zstd need libraries the image does not carry, so we do not ask for them; a server
# that sends them anyway gets a report that says so (parse "none" with the reason).
ACCEPT_ENCODING = "gzip, deflate"
_DECODE_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Decoded:
    body: bytes
    problem: str | None = None  # why `body` is not the whole decoded entity (or not decoded)
    partial: bool = False  # some of the entity was decoded but not all of it
    decoded: bool = True  # False: the coding is unknown, `body` is still encoded


def content_codings(header: str | None) -> list[str]:
    """The codings of a Content-Encoding header, in the order they were applied."""
    codings = [c.strip().lower() for c in (header or "").split(",")]
    return [c for c in codings if c and c != "identity"]


def decode_content(body: bytes, header: str | None, cap: int) -> Decoded:
    """Undo Content-Encoding (gzip, x-gzip, deflate), never producing more than `cap` bytes.

    A body that inflates past `cap` (a compression bomb) is cut there and marked partial, so
    memory stays bounded by `cap` whatever the ratio. A body cut short in transit decodes as far
    as it goes, as in a browser.
    """
    problem: str | None = None
    partial = False
    for coding in reversed(content_codings(header)):
        if coding in ("gzip", "x-gzip"):
            body, why = _inflate(body, cap, 16 + zlib.MAX_WBITS, coding)
        elif coding == "deflate":
            # Browsers accept both zlib-wrapped (as the RFC says) and raw deflate (as IIS sent).
            wbits = zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS
            body, why = _inflate(body, cap, wbits, coding)
        else:
            return Decoded(body, f"Content-Encoding {coding[:40]!r} is not supported",
                           decoded=False)
        if why is not None:
            problem, partial = why, True
    return Decoded(body, problem, partial)


def _inflate(data: bytes, cap: int, wbits: int, coding: str) -> tuple[bytes, str | None]:
    """Decompress `data` (gzip members back to back are one body, as in browsers)."""
    out: list[bytes] = []
    size = 0
    while data:
        engine = zlib.decompressobj(wbits)
        try:
            while size <= cap:  # with no input left, decompress(b"") still flushes output
                chunk = engine.decompress(data, min(_DECODE_CHUNK, cap + 1 - size))
                data = engine.unconsumed_tail
                out.append(chunk)
                size += len(chunk)
                if engine.eof or (not chunk and not data):
                    break
        except zlib.error as exc:
            return b"".join(out)[:cap], f"{coding} body is corrupt after {size} bytes: {exc}"
        if size > cap:
            return (b"".join(out)[:cap],
                    f"{coding} body decodes to more than {cap} bytes; only the first {cap} "
                    "were examined")
        if not engine.eof:
            return b"".join(out), f"{coding} body ends before its end marker (cut in transit)"
        data = engine.unused_data if wbits > 16 else b""
    return b"".join(out), None


# --- MIME sniffing --------------------------------------------------------------------------

_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_UNKNOWN_TYPES = frozenset({"", "unknown/unknown", "application/unknown", "*/*"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# The HTML rows of the MIME Sniffing standard's "identify an unknown MIME type" table: each
# (case-insensitive) followed by a tag-terminating byte (space or '>').
_HTML_SIGNATURES = (b"<!doctype html", b"<html", b"<head", b"<script", b"<iframe", b"<h1",
                    b"<div", b"<font", b"<table", b"<a", b"<style", b"<title", b"<b", b"<body",
                    b"<br", b"<p", b"<!--")
_WS_BYTES = b"\t\n\x0c\r "


def mime_essence(content_type: str | None) -> str:
    """`type/subtype` lower-cased, or "" when the header is missing or not a valid MIME type."""
    essence = (content_type or "").split(";", 1)[0].strip().lower()
    return essence if _TOKEN.match(essence) else ""


def is_html(content_type: str | None, body: bytes) -> bool:
    """HTML by its Content-Type, or - when that is missing, invalid or one of the 'unknown'
    types - by sniffing the first bytes, as browsers do (a body starting with `<div>` is HTML)."""
    essence = mime_essence(content_type)
    if essence not in _UNKNOWN_TYPES:
        return essence in _HTML_TYPES
    return sniff_html(body)


def sniff_html(body: bytes) -> bool:
    head = body[:1445].lstrip(_WS_BYTES)
    for signature in _HTML_SIGNATURES:
        n = len(signature)
        if head[:n].lower() == signature and head[n:n + 1] in (b" ", b">"):
            return True
    return False


# --- character encoding ---------------------------------------------------------------------

_UTF8 = webencodings.lookup("utf-8")
_WINDOWS_1252 = webencodings.lookup("windows-1252")
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_BE, "utf-16be"),
         (codecs.BOM_UTF16_LE, "utf-16le"))
_CHARSET_PARAM = re.compile(r"""charset\s*=\s*(?:"([^"]*)"|([^\s;"]*))""", re.I)


def decode_html(body: bytes, content_type: str | None) -> tuple[str, str]:
    """The text of an HTML body and the encoding's WHATWG name, chosen as the HTML standard's
    encoding sniffing does: BOM, then the Content-Type charset, then `<meta>` in the first
    1024 bytes (prescan), then UTF-8 if the bytes are UTF-8, else windows-1252. Only WHATWG
    labels count (`webencodings`): `idna`, `base64` or a made-up label are no label at all,
    and a `<meta>` that says UTF-16 in an ASCII-compatible stream means UTF-8."""
    encoding = bom_encoding(body) or charset_encoding(content_type) or prescan(body[:1024])
    if encoding is None:
        encoding = _UTF8 if _is_utf8(body) else _WINDOWS_1252
    text, used = webencodings.decode(body, encoding, errors="replace")
    return text, used.name


def bom_encoding(body: bytes) -> webencodings.Encoding | None:
    return next((webencodings.lookup(name) for bom, name in _BOMS if body.startswith(bom)), None)


def charset_encoding(content_type: str | None) -> webencodings.Encoding | None:
    m = _CHARSET_PARAM.search(content_type or "")
    if m is None:
        return None
    return webencodings.lookup((m.group(1) or m.group(2) or "").strip())


def _is_utf8(body: bytes) -> bool:
    try:  # final=False: a multi-byte sequence cut by the body cap is not a reason to doubt it
        codecs.getincrementaldecoder("utf-8")().decode(body, final=False)
    except UnicodeDecodeError:
        return False
    return True


_SPACE = "\t\n\x0c\r "


def prescan(head: bytes) -> webencodings.Encoding | None:
    """The HTML standard's "prescan a byte stream to determine its encoding"."""
    s = head.decode("latin-1")
    pos = 0
    while pos < len(s):
        if s.startswith("<!--", pos):
            end = s.find("-->", pos + 2)  # "<!-->" is a whole comment here too
            if end < 0:
                return None
            pos = end + 3
            continue
        if s[pos:pos + 5].lower() == "<meta" and s[pos + 5:pos + 6] in tuple(_SPACE + "/"):
            found, pos = _meta_charset(s, pos + 6)
            if found is not None:
                return found
            continue
        if s.startswith("<", pos) and _tag_start(s, pos):
            pos = _skip_tag(s, pos)
        elif s.startswith(("<!", "</", "<?"), pos):
            end = s.find(">", pos)
            if end < 0:
                return None
            pos = end
        pos += 1
    return None


def _tag_start(s: str, pos: int) -> bool:
    nxt = s[pos + 1:pos + 2]
    if nxt == "/":
        nxt = s[pos + 2:pos + 3]
    return nxt.isascii() and nxt.isalpha()


def _skip_tag(s: str, pos: int) -> int:
    while pos < len(s) and s[pos] not in _SPACE + ">":
        pos += 1
    while True:
        attr, pos = _attribute(s, pos)
        if attr is None:
            return pos


def _meta_charset(s: str, pos: int) -> tuple[webencodings.Encoding | None, int]:
    seen: set[str] = set()
    got_pragma = False
    need_pragma: bool | None = None
    charset: webencodings.Encoding | None = None
    while True:
        attr, pos = _attribute(s, pos)
        if attr is None:
            break
        name, value = attr
        if name in seen:
            continue
        seen.add(name)
        if name == "http-equiv" and value == "content-type":
            got_pragma = True
        elif name == "content" and charset is None:
            label = _charset_from_content(value)
            if label is not None and webencodings.lookup(label) is not None:
                charset, need_pragma = webencodings.lookup(label), True
        elif name == "charset":
            charset, need_pragma = webencodings.lookup(value), False
    if need_pragma is None or (need_pragma and not got_pragma) or charset is None:
        return None, pos
    if charset.name in ("utf-16be", "utf-16le"):
        return _UTF8, pos  # a UTF-16 document cannot declare itself in ASCII bytes
    if charset.name == "x-user-defined":
        return _WINDOWS_1252, pos
    return charset, pos


def _attribute(s: str, pos: int) -> tuple[tuple[str, str] | None, int]:
    """The standard's "get an attribute": (name, value) lower-cased, or None at '>' or the end."""
    n = len(s)
    while pos < n and s[pos] in _SPACE + "/":
        pos += 1
    if pos >= n or s[pos] == ">":
        return None, pos
    name = ""
    while pos < n:
        c = s[pos]
        if c == "=" and name:
            pos += 1
            return _attribute_value(s, pos, name)
        if c in _SPACE:
            while pos < n and s[pos] in _SPACE:
                pos += 1
            if pos < n and s[pos] == "=":
                return _attribute_value(s, pos + 1, name)
            return (name, ""), pos
        if c in "/>":
            return (name, ""), pos
        name += c.lower()
        pos += 1
    return None, pos


def _attribute_value(s: str, pos: int, name: str) -> tuple[tuple[str, str] | None, int]:
    n = len(s)
    while pos < n and s[pos] in _SPACE:
        pos += 1
    if pos >= n:
        return None, pos
    if s[pos] in "\"'":
        end = s.find(s[pos], pos + 1)
        if end < 0:
            return None, n
        return (name, s[pos + 1:end].lower()), end + 1
    if s[pos] == ">":
        return (name, ""), pos
    start = pos
    while pos < n and s[pos] not in _SPACE + ">":
        pos += 1
    return (name, s[start:pos].lower()), pos


def _charset_from_content(value: str) -> str | None:
    """The standard's "extract a character encoding from a meta element" (content attribute)."""
    pos = 0
    while True:
        at = value.find("charset", pos)
        if at < 0:
            return None
        pos = at + 7
        while pos < len(value) and value[pos] in _SPACE:
            pos += 1
        if pos < len(value) and value[pos] == "=":
            break
    pos += 1
    while pos < len(value) and value[pos] in _SPACE:
        pos += 1
    if pos >= len(value):
        return None
    if value[pos] in "\"'":
        end = value.find(value[pos], pos + 1)
        return value[pos + 1:end] if end >= 0 else None
    end = pos
    while end < len(value) and value[end] not in _SPACE + ";":
        end += 1
    return value[pos:end]
