"""`python3 -m fetcher URL`: print exactly one JSON report on stdout, exit 0.

Exit status 2 only for a usage error (the caller's bug); a report is printed even then.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

from . import fetch, htmlscan, reportfit


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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        _emit(fetch.error_report("", "INVALID_URL", "usage: python3 -m fetcher URL"))
        return 2
    env = dict(os.environ)
    _arm_alarm(env)
    try:
        report = fetch.run(args[0], env)
    except fetch.HardDeadline:
        report = fetch.error_report(args[0], "READ_TIMEOUT", "hard deadline reached")
    signal.setitimer(signal.ITIMER_REAL, 0)
    _emit(report)
    if htmlscan.parse_running():
        # A parse that overran its budget is still running in C: do not wait for it, and do
        # not tear the interpreter down under it. The report is out; exit now.
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
