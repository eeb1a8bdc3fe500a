"""The operator's blocklist: domains (with their subdomains) and exact URLs, read from one file
and re-read when it changes."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import NamedTuple

from .urls import canonical_host, canonical_ip, host_of, normalize_url

log = logging.getLogger(__name__)


class _Entries(NamedTuple):
    domains: Mapping[str, str]  # canonical domain or IP -> entry as written
    urls: Mapping[str, str]  # normalized URL -> entry as written


_EMPTY = _Entries({}, {})


def _parse_entry(text: str) -> tuple[str, str] | None:
    """('domain' | 'url', key) for one entry, or None when it is not valid."""
    try:
        if "://" in text:
            return "url", normalize_url(text)
        domain = text.removeprefix("*.").lstrip(".")
        return "domain", canonical_host(domain)
    except ValueError:
        return None


def _parse_blocklist(text: str, path: str) -> _Entries:
    domains: dict[str, str] = {}
    urls: dict[str, str] = {}
    invalid = 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = line.split()[0]  # an entry has no spaces; anything after is a comment
        parsed = _parse_entry(entry)
        if parsed is None:
            invalid += 1
            continue
        kind, key = parsed
        (domains if kind == "domain" else urls).setdefault(key, entry)
    if invalid:
        log.warning("blocklist %s: ignored %d invalid entries", path, invalid)
    return _Entries(domains, urls)


class Blocklist:
    """Domains and URLs from a file, one a line; reloads itself when the file changes.

    A domain entry matches the domain and all its subdomains; a URL entry matches that
    normalized URL. `#` starts a comment line. A missing or unreadable file is an empty list
    (with a warning), never an error: the blocklist must not stop scanning.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *,
                 check_interval_s: float = 1.0) -> None:
        self.path = os.fspath(path) if path else None
        self.check_interval_s = check_interval_s
        self._entries = _EMPTY
        self._stamp: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) last loaded
        self._failed = False  # already warned about the current failure
        self._checked_at = -float("inf")
        self._lock = threading.Lock()  # the worker may analyze from several threads
        self.refresh(force=True)

    @property
    def entry_count(self) -> int:
        # Not __len__: an empty-but-configured blocklist must not be falsy to `if blocklist:`.
        return len(self._entries.domains) + len(self._entries.urls)

    def refresh(self, *, force: bool = False) -> None:
        """Reload if the file changed; stat at most once per check interval unless forced."""
        if self.path is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked_at < self.check_interval_s:
                return
            self._checked_at = now
            self._reload_if_changed(self.path)

    def _reload_if_changed(self, path: str) -> None:
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp and not self._failed:
                return
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            self._fail(path, exc)
            return
        self._entries = _parse_blocklist(text, path)
        self._stamp = stamp
        self._failed = False
        log.info("blocklist %s loaded: %d entries", path, self.entry_count)

    def _fail(self, path: str, exc: OSError) -> None:
        if not self._failed:  # once per failure, not once per second
            log.warning("blocklist %s unavailable, using an empty list: %s", path, exc)
        self._entries, self._stamp, self._failed = _EMPTY, None, True

    def match(self, url: str) -> str | None:
        """The entry (as written in the file) that blocks `url`, or None. Never raises."""
        self.refresh()
        entries = self._entries
        try:
            key = normalize_url(url)
        except ValueError:
            return None
        if key in entries.urls:
            return entries.urls[key]
        host = host_of(key)
        if host is None:
            return None
        if canonical_ip(host) is not None or ":" in host:
            return entries.domains.get(host)
        labels = host.split(".")
        for i in range(len(labels)):  # the host, then each parent domain
            entry = entries.domains.get(".".join(labels[i:]))
            if entry is not None:
                return entry
        return None
