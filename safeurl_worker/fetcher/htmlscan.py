"""Extract the page features the worker scores from the tree a browser would build.

The page is parsed by Lexbor (`selectolax`), an HTML5 parser that follows the WHATWG tree
construction rules, so comment and markup tricks (`<!-- --!>`, `<!-->`, `<![x[>`, misnested
tables) hide nothing from us that they do not hide from a browser. Nothing is ever executed.

Parsing is bounded three ways, and reaching a bound gives `parse: "partial"` with the features
of what was parsed (never an empty report): a size cap (`MAX_PARSE_CHARS`), an element cap
(`MAX_TAGS`, checked before parsing; Lexbor's DOM costs about 1 KB per element) and a time
budget. Lexbor is superlinear on some inputs (deeply nested elements, thousands of attributes on
one tag) and cannot be interrupted, so the text is parsed in growing prefixes, each in a thread
with the time left; the longest prefix parsed in time is the one used.

Every list and string is bounded here to the limits of `safeurl_worker.models.Features`; what
was left out is counted in `PageFeatures.dropped`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from selectolax.lexbor import LexborHTMLParser, LexborNode

from . import weburl

MAX_URL = 8192
MAX_FORMS = 50
MAX_IFRAMES = 50
MAX_SCRIPTS = 50
MAX_JS_REDIRECTS = 20
MAX_TITLE = 1024
MAX_LABEL = 256
MAX_HEADINGS = 20
MAX_BUTTONS = 20
MAX_ICONS = 10
MAX_IMAGES = 50
MAX_STYLESHEETS = 50
MAX_TEXT = 4096
MAX_FIELDS = 256  # controls examined per form (hidden inputs not counted)
# Inline script text kept for the statistics; beyond this a page is scored on what was kept.
MAX_SCRIPT_TEXT = 4 * 1024 * 1024

MAX_PARSE_CHARS = 4 * 1024 * 1024
MAX_TAGS = 150_000  # '<' characters parsed: an upper bound on elements, hence on DOM memory
PARSE_BUDGET_S = 4.0
FIRST_PREFIX = 16 * 1024  # always parsed, in this thread: cheap even at Lexbor's worst
PREFIX_GROWTH = 4
TEXT_NODE_BUDGET = 100_000  # nodes visited for the visible text
LABEL_NODE_BUDGET = 400  # nodes visited for one short label

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
_ASCII_WS = "\t\n\x0c\r "
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)

# What a form asks for, read from a control's type, autocomplete, name, id, placeholder,
# aria-label and label text.
_EMAIL_HINT = re.compile(r"e-?mail|user|login|account|ident|\bid\b|correo|courriel|benutzer",
                         re.I)
# Kits misspell the type (`type="Contraseña"` is a text field) yet ask for the password.
_PASSWORD_HINT = re.compile(r"passw|(?<![a-z])pwd?(?![a-z])|contrase|mot de passe|kennwort|"
                            "senha|wachtwoord|\u043f\u0430\u0440\u043e\u043b\u044c|"
                            "\u5bc6\u7801|\u30d1\u30b9\u30ef\u30fc\u30c9", re.I)
_CARD_HINT = re.compile(r"card|cc-?(?:num|exp|csc|cvv)|ccnum|\bcvv|\bcvc|\bcsc\b|expir|"
                        r"\bexp(?:iry)?[-_ ]?(?:date|month|year)|mm\s*/\s*yy|credit|tarjeta|"
                        r"karte", re.I)
_OTP_HINT = re.compile(r"\botp\b|one[-_ ]?time|\b2fa\b|\bmfa\b|two[-_ ]?(?:factor|step)|"
                       r"verification[-_ ]?code|verify[-_ ]?code|sms[-_ ]?code|auth\w*[-_ ]?code|"
                       r"passcode|security[-_ ]?code|(?:sms|text|login|access)[-_ ]?code", re.I)
_CARD_AUTOCOMPLETE = ("cc-number", "cc-exp", "cc-exp-month", "cc-exp-year", "cc-csc")
_NOT_FIELDS = frozenset({"hidden", "submit", "button", "reset", "image", "checkbox", "radio",
                         "file", "range", "color"})
_SUBMIT_TYPES = frozenset({"submit", "button", "reset", "image"})
_BLOCKS = frozenset({
    "address", "article", "aside", "blockquote", "br", "button", "dd", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
    "header", "hr", "label", "legend", "li", "main", "nav", "ol", "option", "p", "pre",
    "section", "table", "td", "th", "tr", "ul"})
_INVISIBLE = frozenset({"script", "style", "noscript", "template", "head", "title", "iframe",
                        "object", "embed", "frameset"})


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
    headings: list[str] = field(default_factory=list)
    meta: dict[str, str | None] = field(default_factory=dict)
    icons: list[str] = field(default_factory=list)
    images: list[dict[str, str]] = field(default_factory=list)
    stylesheets: list[str] = field(default_factory=list)
    buttons: list[str] = field(default_factory=list)
    text: str = ""
    parse: str = "none"
    parse_problem: str | None = None
    encoding: str | None = None  # not part of the report
    dropped: dict[str, int] = field(default_factory=dict)  # items left out, per feature

    def features(self) -> dict[str, Any]:
        """The report's `features` object."""
        return {
            "parse": self.parse,
            "parse_problem": self.parse_problem[:2048] if self.parse_problem else None,
            "forms": self.forms[:MAX_FORMS],
            "iframes": self.iframes[:MAX_IFRAMES],
            "meta_refresh": self.meta_refresh,
            "js_redirects": self.js_redirects[:MAX_JS_REDIRECTS],
            "external_scripts": self.external_scripts[:MAX_SCRIPTS],
            "scripts": self.scripts,
            "links_count": self.links_count,
            "headings": self.headings[:MAX_HEADINGS],
            "meta": self.meta,
            "icons": self.icons[:MAX_ICONS],
            "images": self.images[:MAX_IMAGES],
            "stylesheets": self.stylesheets[:MAX_STYLESHEETS],
            "buttons": self.buttons[:MAX_BUTTONS],
            "text": self.text[:MAX_TEXT],
        }

    def add(self, name: str, items: list[Any], item: Any, limit: int) -> None:
        """Append `item` unless the list is full; count it as dropped if it is."""
        if len(items) < limit:
            items.append(item)
        else:
            self.drop(name)

    def drop(self, name: str, count: int = 1) -> None:
        self.dropped[f"features.{name}"] = self.dropped.get(f"features.{name}", 0) + count

    def full(self, name: str, items: list[Any], limit: int, left: int) -> bool:
        """True (and the `left` items not looked at counted) once `items` has `limit` items."""
        if len(items) < limit:
            return False
        self.drop(name, left)
        return True

    def mark_partial(self, problem: str) -> None:
        if self.parse != "none":
            self.parse = "partial"
        self.parse_problem = f"{self.parse_problem}; {problem}" if self.parse_problem else problem


def empty_features(problem: str | None = None) -> dict[str, Any]:
    return PageFeatures(scripts=script_stats([], 0), parse_problem=problem).features()


# --- small pure helpers ---------------------------------------------------------------------


def collapse(text: str) -> str:
    """Whitespace runs as one space, trimmed (as titles and labels are shown; a no-break
    space counts too, so "Pay\u00a0Pal" reads as the words a visitor sees)."""
    return " ".join(text.split())


def resolve(base: str, ref: str) -> str:
    """Absolute URL like a browser (WHATWG, via weburl.join), bounded in length. A reference a
    browser could not resolve is kept as written, so the analysis still sees it."""
    try:
        joined = weburl.join(base, ref)
    except ValueError:  # UnicodeError included; join itself returns None for what it refuses
        joined = None
    if joined is None:
        return ref.strip(_ASCII_WS)[:MAX_URL]
    return joined[:MAX_URL]


def parse_refresh(content: str) -> tuple[float, str | None] | None:
    """The HTML standard's "shared declarative refresh steps" for `<meta http-equiv=refresh>`
    and the `Refresh` header: None when it is not a refresh at all, else (delay, URL or None
    for "reload this page")."""
    s, pos, n = content, 0, len(content)
    while pos < n and s[pos] in _ASCII_WS:
        pos += 1
    start = pos
    while pos < n and s[pos].isascii() and s[pos].isdigit():
        pos += 1
    if pos == start and (pos >= n or s[pos] != "."):
        return None
    delay = float(s[start:pos] or 0)
    while pos < n and (s[pos] == "." or (s[pos].isascii() and s[pos].isdigit())):
        pos += 1
    if pos >= n:
        return delay, None
    if s[pos] not in ";," + _ASCII_WS:
        return None
    while pos < n and s[pos] in _ASCII_WS:
        pos += 1
    if pos < n and s[pos] in ";,":
        pos += 1
        while pos < n and s[pos] in _ASCII_WS:
            pos += 1
    if pos >= n:
        return delay, None
    return delay, _refresh_url(s, pos) or None


def _refresh_url(s: str, pos: int) -> str:
    url_start = pos
    rest = s[pos:]
    if rest[:3].lower() == "url":
        pos += 3
        while pos < len(s) and s[pos] in _ASCII_WS:
            pos += 1
        if pos < len(s) and s[pos] == "=":
            pos += 1
            while pos < len(s) and s[pos] in _ASCII_WS:
                pos += 1
        else:
            pos = url_start  # "url" not followed by '=': it is the URL itself
    quote = s[pos] if pos < len(s) and s[pos] in "'\"" else None
    if quote:
        pos += 1
    url = s[pos:]
    if quote and quote in url:
        url = url[:url.index(quote)]
    return url.strip(_ASCII_WS)


def _hidden(node: LexborNode) -> bool:
    attrs = node.attrs
    if "hidden" in attrs:
        return True
    style = attrs.get("style") or ""
    return bool(style) and _HIDDEN_STYLE.search(style) is not None


def _hidden_iframe(node: LexborNode) -> bool:
    if _hidden(node):
        return True
    attrs = node.attrs
    for dim in ("width", "height"):
        value = (attrs.get(dim) or "").strip().lower().removesuffix("px").strip()
        if value in ("0", "1"):
            return True
    return False


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


def short_text(node: LexborNode, limit: int = MAX_LABEL,
               max_nodes: int = LABEL_NODE_BUDGET) -> str:
    """The visible words inside `node`, collapsed and cut; bounded work whatever the subtree."""
    parts = visible_text(node, limit, max_nodes)
    return collapse(parts)[:limit]


def visible_text(root: LexborNode, limit: int, max_nodes: int) -> str:
    """Text a reader would see under `root`, in order, with a space at block boundaries;
    stops after about `limit` characters or `max_nodes` nodes."""
    out: list[str] = []
    size = visited = 0
    stack: list[LexborNode | str | None] = [root.first_child]
    while stack and size < limit * 2 + 64 and visited < max_nodes:
        node = stack.pop()
        if node is None:
            continue
        if isinstance(node, str):
            out.append(node)
            continue
        visited += 1
        stack.append(node.next)
        if node.is_text_node:
            text = node.text_content or ""
            out.append(text)
            size += len(text)
        elif node.is_element_node:
            tag = node.tag or ""
            if tag in _INVISIBLE or _hidden(node):
                continue
            if tag in _BLOCKS:
                out.append(" ")
                stack.append(" ")
            stack.append(node.first_child)
    return "".join(out)


# --- parsing within bounds ------------------------------------------------------------------


def parse_bounded(text: str, budget_s: float) -> tuple[LexborHTMLParser, int, str | None]:
    """Parse `text` (or the longest prefix the bounds allow): (tree, characters parsed, why
    the parse stopped short or None)."""
    problem = None
    limit = min(len(text), MAX_PARSE_CHARS)
    if limit < len(text):
        problem = f"page is {len(text)} characters; the first {MAX_PARSE_CHARS} were parsed"
    tag_cut = _nth_index(text, "<", MAX_TAGS, limit)
    if tag_cut < limit:
        limit = tag_cut
        problem = f"more than {MAX_TAGS} tags; the first {MAX_TAGS} were parsed"
    deadline = time.monotonic() + budget_s
    size = min(limit, FIRST_PREFIX)
    tree = LexborHTMLParser(text[:size], scripting=True)
    while size < limit:
        nxt = limit if size * PREFIX_GROWTH * 2 > limit else size * PREFIX_GROWTH
        bigger = _parse_in_time(text[:nxt], deadline - time.monotonic())
        if bigger is None:
            problem = (f"parse time budget ({budget_s:.1f} s) reached; the first {size} of "
                       f"{len(text)} characters were parsed")
            break
        tree, size = bigger, nxt
    return tree, size, problem


def _nth_index(text: str, char: str, n: int, end: int) -> int:
    """Index of the n-th `char` in text[:end], or `end` when there are fewer."""
    if text.count(char, 0, end) < n:
        return end
    pos = -1
    for _ in range(n):
        pos = text.find(char, pos + 1, end)
    return pos


def _parse_in_time(text: str, timeout: float) -> LexborHTMLParser | None:
    """Parse in a daemon thread (Lexbor releases the GIL); None if it is not done in time. A
    parse that overruns is abandoned: it cannot be stopped, but it dies with the process."""
    if timeout <= 0:
        return None
    box: list[LexborHTMLParser] = []
    thread = threading.Thread(target=lambda: box.append(LexborHTMLParser(text, scripting=True)),
                              name=PARSE_THREAD, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or not box:
        return None
    return box[0]


PARSE_THREAD = "lexbor-parse"  # an abandoned parse still running has this name


def parse_running() -> bool:
    """A parse that overran its budget is still running (the process must not wait for it)."""
    return any(t.name == PARSE_THREAD and t.is_alive() for t in threading.enumerate())


# --- the features -----------------------------------------------------------------------------


class _Extractor:
    def __init__(self, tree: LexborHTMLParser, url: str, deadline: float) -> None:
        self.tree = tree
        self.url = url  # the document's URL (form actions default to it)
        self.base = url  # <base href> applies to every other URL of the document
        self.deadline = deadline
        self.page = PageFeatures(parse="full")

    def run(self) -> PageFeatures:
        base = self.tree.css_first("base[href]")
        if base is not None:
            self.base = resolve(self.url, base.attrs.get("href") or "")
        steps: dict[str, Callable[[], None]] = {
            "title": self._title, "meta": self._meta, "links": self._links,
            "forms": self._forms, "buttons": self._buttons, "headings": self._headings,
            "iframes": self._iframes, "scripts": self._scripts, "images": self._images,
            "anchors": self._anchors, "text": self._text}
        for name, step in steps.items():
            if self._late():
                break
            try:
                step()
            except Exception as exc:  # a bug on one hostile page must not cost the rest
                self.page.mark_partial(f"{name} not read: {type(exc).__name__}")
        if not self.page.scripts:
            self.page.scripts = script_stats([], 0)
        return self.page

    def _late(self) -> bool:
        if time.monotonic() <= self.deadline:
            return False
        if "while extracting" not in (self.page.parse_problem or ""):
            self.page.mark_partial("parse time budget reached while extracting features")
        return True

    def _all(self, query: str) -> list[LexborNode]:
        return self.tree.css(query)

    def _title(self) -> None:
        node = self.tree.css_first("title")
        if node is not None:
            self.page.title = collapse(node.text(deep=False)[: MAX_TITLE * 8])[:MAX_TITLE]

    def _meta(self) -> None:
        meta: dict[str, str | None] = {}
        wanted = {"og:site_name": "og_site_name", "og:title": "og_title", "og:url": "og_url",
                  "og:image": "og_image", "og:image:url": "og_image",
                  "og:image:secure_url": "og_image", "application-name": "application_name",
                  "description": "description"}
        for node in self._all("meta"):
            attrs = node.attrs
            if (attrs.get("http-equiv") or "").strip().lower() == "refresh":
                self._refresh(attrs.get("content") or "")
                continue
            key = wanted.get((attrs.get("property") or attrs.get("name") or "").strip().lower())
            content = attrs.get("content")
            if key is None or content is None or meta.get(key):
                continue
            if key in ("og_url", "og_image"):
                meta[key] = resolve(self.base, content)
            else:
                meta[key] = collapse(content[: MAX_LABEL * 8])[:MAX_LABEL] or None
        self.page.meta.update(meta)

    def _refresh(self, content: str) -> None:
        if self.page.meta_refresh is not None:
            return
        parsed = parse_refresh(content)
        if parsed is not None and parsed[1] is not None:
            self.page.meta_refresh = resolve(self.base, parsed[1])
            self.page.meta_refresh_delay = parsed[0]

    def _links(self) -> None:
        page = self.page
        for node in self._all("link[href]"):
            rel = (node.attrs.get("rel") or "").lower().split()
            href = node.attrs.get("href") or ""
            if "canonical" in rel and "canonical" not in page.meta:
                page.meta["canonical"] = resolve(self.base, href)
            if any(r in ("icon", "apple-touch-icon", "apple-touch-icon-precomposed", "mask-icon")
                   for r in rel):
                page.add("icons", page.icons, resolve(self.base, href), MAX_ICONS)
            if "stylesheet" in rel:
                page.add("stylesheets", page.stylesheets, resolve(self.base, href),
                         MAX_STYLESHEETS)

    def _forms(self) -> None:
        forms = self._all("form")
        owned: dict[str, list[LexborNode]] = {}
        # form= wins over the ancestor form (and makes a control belong to no form when it
        # names none)
        for node in self._all("input[form], select[form], textarea[form], button[form]"):
            owner = (node.attrs.get("form") or "")
            if not _hidden_input(node) and len(owned.setdefault(owner, [])) < MAX_FIELDS:
                owned[owner].append(node)
        labels = _labels_by_id(self._all("label[for]"))
        entries: list[dict[str, Any]] = []
        for i, form in enumerate(forms):
            if self._late():
                self.page.drop("forms", len(forms) - i)
                break
            controls = _own_controls(form)
            form_id = form.attrs.get("id")
            if form_id:
                controls += owned.get(form_id, [])
            entries.append(self._form(form, controls, labels))
        # Forms that ask for credentials first, so decoy forms before them cannot push them
        # past the cap (here or when the report is fitted to the stdout cap).
        entries.sort(key=lambda e: not any(e[k] for k in _ASKS))
        self.page.forms.extend(entries[:MAX_FORMS])
        if len(entries) > MAX_FORMS:
            self.page.drop("forms", len(entries) - MAX_FORMS)

    def _form(self, form: LexborNode, controls: list[LexborNode],
              labels: dict[str, LexborNode]) -> dict[str, Any]:
        action = (form.attrs.get("action") or "").strip(_ASCII_WS)
        method = (form.attrs.get("method") or "get").strip().lower()
        entry: dict[str, Any] = {
            "action": resolve(self.base, action) if action else self.url[:MAX_URL],
            "method": method if method in ("get", "post", "dialog") else "get",
            "has_password": False, "has_email": False, "has_card": False, "has_otp": False,
        }
        words: list[str] = [short_text(form)]  # its labels and button text, in order
        for control in controls:
            hint, shown = _control_hints(control, labels, form)
            words.append(shown)
            kind = (control.attrs.get("type") or "").strip().lower()
            if (control.tag == "input" and kind in _NOT_FIELDS) or control.tag == "button":
                continue
            auto = (control.attrs.get("autocomplete") or "").lower()
            if (kind == "password" or "current-password" in auto or "new-password" in auto
                    or _PASSWORD_HINT.search(hint)):
                entry["has_password"] = True
            if kind == "email" or "email" in auto or "username" in auto or _EMAIL_HINT.search(
                    hint):
                entry["has_email"] = True
            if any(a in auto for a in _CARD_AUTOCOMPLETE) or _CARD_HINT.search(hint):
                entry["has_card"] = True
            elif "one-time-code" in auto or _OTP_HINT.search(hint):
                entry["has_otp"] = True
        entry["text"] = collapse(" ".join(w for w in words if w))[:MAX_LABEL]
        return entry

    def _buttons(self) -> None:
        query = ("button, input[type=submit], input[type=button], input[type=image], "
                 "input[type=reset], [role=button]")
        self._texts("buttons", self.page.buttons, MAX_BUTTONS, self._all(query), _button_text)

    def _headings(self) -> None:
        self._texts("headings", self.page.headings, MAX_HEADINGS, self._all("h1, h2, h3"),
                    short_text)

    def _texts(self, name: str, items: list[str], limit: int, nodes: list[LexborNode],
               read: Callable[[LexborNode], str]) -> None:
        """The non-empty text of each node, in page order, up to `limit` (the rest counted)."""
        for i, node in enumerate(nodes):
            if self.page.full(name, items, limit, len(nodes) - i):
                break
            text = read(node)
            if text:
                items.append(text)

    def _iframes(self) -> None:
        nodes = self._all("iframe, frame")
        for i, node in enumerate(nodes):
            if self.page.full("iframes", self.page.iframes, MAX_IFRAMES, len(nodes) - i):
                break
            src = node.attrs.get("src")
            url = resolve(self.base, src) if src and src.strip(_ASCII_WS) else "about:blank"
            self.page.add("iframes", self.page.iframes,
                          {"src": url, "hidden": _hidden_iframe(node)}, MAX_IFRAMES)

    def _scripts(self) -> None:
        texts: list[str] = []
        chars = inline = 0
        for node in self._all("script"):
            src = node.attrs.get("src")
            if src is not None and src.strip(_ASCII_WS):
                url = resolve(self.base, src)
                if url not in self.page.external_scripts:
                    self.page.add("external_scripts", self.page.external_scripts, url,
                                  MAX_SCRIPTS)
                continue
            inline += 1
            if chars < MAX_SCRIPT_TEXT:
                text = node.text(deep=True)[: MAX_SCRIPT_TEXT - chars]
                texts.append(text)
                chars += len(text)
        self.page.scripts = script_stats(texts, inline)
        self.page.js_redirects = js_redirects(texts, self.base)

    def _images(self) -> None:
        nodes = self._all("img, input[type=image]")
        for i, node in enumerate(nodes):
            if self.page.full("images", self.page.images, MAX_IMAGES, len(nodes) - i):
                break
            src = _image_src(node)
            if src is None:
                continue
            alt = collapse((node.attrs.get("alt") or "")[: MAX_LABEL * 8])[:MAX_LABEL]
            self.page.add("images", self.page.images,
                          {"src": resolve(self.base, src), "alt": alt}, MAX_IMAGES)

    def _anchors(self) -> None:
        self.page.links_count = len(self._all("a[href], area[href]"))

    def _text(self) -> None:
        root = self.tree.body or self.tree.root
        if root is not None:
            text = visible_text(root, MAX_TEXT, TEXT_NODE_BUDGET)
            self.page.text = collapse(text)[:MAX_TEXT]


def _labels_by_id(nodes: Iterable[LexborNode]) -> dict[str, LexborNode]:
    labels: dict[str, LexborNode] = {}
    for node in nodes:
        target = node.attrs.get("for")
        if target and target not in labels and len(labels) < 5000:
            labels[target] = node
    return labels


_TABLE_PARTS = frozenset({"table", "tbody", "thead", "tfoot", "tr"})
_CONTROLS = "input, select, textarea, button"


def _own_controls(form: LexborNode) -> list[LexborNode]:
    """The controls whose form owner is `form` by position (those with `form=` go by id).

    `<table><form><tr><td><input>` leaves the form empty in the DOM, yet the parser's form
    element pointer makes it the inputs' owner (a browser submits them with it): a form that
    is a direct child of table markup owns the unowned controls of its table."""
    controls = [c for c in form.css(_CONTROLS)
                if "form" not in c.attrs and not _hidden_input(c)][:MAX_FIELDS]
    parent = form.parent
    if controls or parent is None or parent.tag not in _TABLE_PARTS:
        return controls
    table: LexborNode | None = parent
    while table is not None and table.tag != "table":
        table = table.parent
    if table is None:
        return controls
    return [c for c in table.css(_CONTROLS)
            if "form" not in c.attrs and not _hidden_input(c)
            and not _inside(c, "form", table)][:MAX_FIELDS]


_ASKS = ("has_password", "has_card", "has_otp", "has_email")


def _hidden_input(node: LexborNode) -> bool:
    """<input type=hidden>: carries no label and asks the user nothing (and is free padding)."""
    return node.tag == "input" and (node.attrs.get("type") or "").strip().lower() == "hidden"


def _inside(node: LexborNode, tag: str, stop: LexborNode) -> bool:
    parent = node.parent
    for _ in range(64):
        if parent is None or parent.mem_id == stop.mem_id:
            return False
        if parent.tag == tag:
            return True
        parent = parent.parent
    return False


def _control_hints(control: LexborNode, labels: dict[str, LexborNode],
                   form: LexborNode) -> tuple[str, str]:
    """(every word that says what the control is, the words a visitor sees next to it that
    the form's own text does not already have)."""
    attrs = control.attrs
    label: list[str] = []
    node_id = attrs.get("id")
    if node_id and node_id in labels:
        label.append(short_text(labels[node_id]))
    parent, depth = control.parent, 0
    while parent is not None and depth < 16 and parent.tag not in ("form", "body"):
        if parent.tag == "label":
            label.append(short_text(parent))
            break
        parent, depth = parent.parent, depth + 1
    shown = [(attrs.get(name) or "")[:MAX_LABEL] for name in ("placeholder", "aria-label")]
    if control.tag == "input" and (attrs.get("type") or "").lower() in _SUBMIT_TYPES:
        shown.append(_button_text(control))
    if not _inside(control, "form", form.parent or form):  # owned through form=
        shown = label + shown
        if control.tag == "button":
            shown.append(_button_text(control))
    hidden = [(attrs.get(name) or "")[:MAX_LABEL] for name in ("name", "id", "autocomplete")]
    return " ".join(label + shown + hidden), " ".join(s for s in shown if s)


def _button_text(node: LexborNode) -> str:
    attrs = node.attrs
    if node.tag == "input":
        kind = (attrs.get("type") or "").strip().lower()
        default = {"submit": "Submit", "reset": "Reset"}.get(kind, "")
        value = attrs.get("alt") if kind == "image" else attrs.get("value")
        text = value if value is not None else default
    else:
        text = short_text(node)
    text = text or attrs.get("aria-label") or attrs.get("title") or ""
    return collapse(text[: MAX_LABEL * 8])[:MAX_LABEL]


def _image_src(node: LexborNode) -> str | None:
    attrs = node.attrs
    src = (attrs.get("src") or "").strip(_ASCII_WS)
    if not src:  # the first candidate of a srcset (or of a lazy-loading data-src)
        srcset = (attrs.get("srcset") or attrs.get("data-srcset") or "").strip(_ASCII_WS)
        src = srcset.split(",")[0].split()[0] if srcset else (attrs.get("data-src") or "")
    return src.strip(_ASCII_WS) or None


def scan_html(text: str, base_url: str, budget_s: float = PARSE_BUDGET_S) -> PageFeatures:
    """Features of an HTML document as a browser would build it; URLs are resolved against
    `base_url` (or the first `<base href>`). Takes about `budget_s` at most: 60 % of it for
    parsing, the rest (and at least 30 % of it) for the extraction."""
    start = time.monotonic()
    tree, _parsed, problem = parse_bounded(text, budget_s * 0.6)
    deadline = max(start + budget_s, time.monotonic() + budget_s * 0.3)
    page = _Extractor(tree, base_url, deadline).run()
    if problem is not None:
        page.mark_partial(problem)
    return page
