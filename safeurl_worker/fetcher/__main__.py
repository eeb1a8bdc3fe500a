"""`python3 -m fetcher URL`: print exactly one JSON report on stdout, exit 0.

Without an argument the URL is the first line of stdin (at most `netcheck.MAX_URL` bytes plus
the newline): the worker's warm containers are made (and with WARM_START, started) before their
job exists, so the URL can only reach them through stdin (docs/sandbox.md, "Warm containers").
Everything is imported before the URL is read, so a started one has only the fetch left to do.

Exit status 2 only for a usage error (the caller's bug); a report is printed even then.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any, BinaryIO

from . import fetch, htmlscan, netcheck, reportfit

USAGE = "usage: python3 -m fetcher URL (or the URL as one line on stdin)"


def _emit(report: dict[str, Any]) -> None:
    """UTF-8 bytes, whatever the locale: the size reportfit measured is the size written."""
    sys.stdout.buffer.write(reportfit.dumps(report) + b"\n")
    sys.stdout.flush()


def _hard_deadline(signum: int, frame: FrameType | None) -> None:
    raise fetch.HardDeadline


def _arm_alarm(env: dict[str, str]) -> None:
    """Last resort behind the per-socket deadline: if anything else hangs (parsing a hostile
    page), interrupt it shortly after the deadline so a report is still printed."""
    try:
        timeout = fetch.FetchConfig.from_env(env).timeout_s
    except ValueError:
        return
    signal.signal(signal.SIGALRM, _hard_deadline)
    signal.setitimer(signal.ITIMER_REAL, timeout + 2.0)


def _url_from_stdin(stdin: BinaryIO) -> str | None:
    """One line, bounded: a longer line is never read whole (and would be refused anyway)."""
    line = stdin.readline(netcheck.MAX_URL + 2)  # the URL, and "\r\n" at most
    url = line.rstrip(b"\r\n")
    if not url or len(url) > netcheck.MAX_URL:
        return None
    return url.decode("utf-8", "replace")  # never bytes the report cannot encode


def main(argv: list[str] | None = None, stdin: BinaryIO | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    url = args[0] if len(args) == 1 else None
    if not args:
        # A container started ahead of its job waits here, for as long as it takes: its
        # deadlines start with the URL (the worker kills a container that overruns its own).
        url = _url_from_stdin(stdin or sys.stdin.buffer)
    if url is None:
        _emit(fetch.error_report("", "INVALID_URL", USAGE))
        return 2
    _arm_alarm(env)
    try:
        report = fetch.run(url, env)
    except fetch.HardDeadline:
        report = fetch.error_report(url, "READ_TIMEOUT", "hard deadline reached")
    signal.setitimer(signal.ITIMER_REAL, 0)
    _emit(report)
    if htmlscan.parse_running():
        # A parse that overran its budget is still running in C: do not wait for it, and do
        # not tear the interpreter down under it. The report is out; exit now.
        os._exit(0)
    return 0


if __name__ == "__main__":
    code = main()
    # The report is out: skip the interpreter's teardown (tens of milliseconds of module
    # clean-up on every scan's critical path; nothing is left to flush or close).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
