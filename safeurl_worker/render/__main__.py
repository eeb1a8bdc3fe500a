"""`python3 -m sandbox.render URL` (or the URL as one line on stdin): print exactly one JSON
report on stdout, exit 0. Exit 2 only for a usage error (a report is printed even then)."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

from ..fetcher import reportfit
from . import scan
from .browse import RenderConfig

# Last resort past the deadline and the render's own grace: print a report and leave.
HARD_EXTRA_S = 8.0


def _emit(report: dict[str, Any]) -> None:
    sys.stdout.buffer.write(reportfit.dumps(report) + b"\n")
    sys.stdout.flush()


def _arm_alarm(url: str, env: dict[str, str]) -> None:
    try:
        timeout = RenderConfig.from_env(env).fetch.timeout_s
    except ValueError:
        return

    def fire(signum: int, frame: FrameType | None) -> None:
        _emit(scan.error_report(url, "READ_TIMEOUT", "hard deadline reached"))
        os._exit(0)

    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, timeout + scan.GRACE_S + HARD_EXTRA_S)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args and not sys.stdin.isatty():
        line = sys.stdin.readline(16 * 1024).strip()
        args = [line] if line else []
    if len(args) != 1:
        _emit(scan.error_report("", "INVALID_URL", "usage: python3 -m sandbox.render URL"))
        return 2
    env = dict(os.environ)
    _arm_alarm(args[0], env)
    report = scan.run(args[0], env)
    signal.setitimer(signal.ITIMER_REAL, 0)
    _emit(report)
    # The report is out and the browser closed. Do not wait for what may still be running: an
    # abandoned DNS lookup, or a parse that overran its budget (still running in C).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
