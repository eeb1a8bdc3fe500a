"""Turn a fetcher report into a verdict: named rules, each contributing weighted signals.

Everything here is a pure function of (requested URL, report) except `Blocklist`, which reads one
file. The report is untrusted (it was produced next to hostile content), so every URL in it is
parsed defensively: a URL that does not parse simply contributes nothing, it never raises.

See docs/analysis.md for the rule table, the weights and the reasoning behind them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial

from .blocklist import Blocklist
from .models import Analysis, Report, Signal, Verdict
from .rules import (
    _CHECKS,
    ANALYZER_VERSION,
    DEFAULT_MALICIOUS_THRESHOLD,
    DEFAULT_SUSPICIOUS_THRESHOLD,
    MAX_SCORE,
    RULES,
    RuleCheck,
    blocklist_hit,
)

log = logging.getLogger(__name__)

# --- scoring --------------------------------------------------------------------------------


def _classify(score: int, suspicious_threshold: int, malicious_threshold: int) -> Verdict:
    if score >= malicious_threshold:
        return Verdict.MALICIOUS
    if score >= suspicious_threshold:
        return Verdict.SUSPICIOUS
    return Verdict.SAFE


def _score(signals: Iterable[Signal]) -> int:
    return max(0, min(MAX_SCORE, sum(s.weight for s in signals)))


def _fetched(report: Report) -> bool:
    return not (report.error is not None and report.http_status is None)


def _run(name: str, check: RuleCheck, url: str, report: Report) -> list[Signal]:
    """One rule; a bug in one rule must not lose the whole verdict."""
    try:
        return list(check(url, report))
    except Exception:
        log.exception("analysis rule %s failed", name)
        return []


def analyze(url: str, report: Report, *, blocklist: Blocklist | None = None,
            suspicious_threshold: int = DEFAULT_SUSPICIOUS_THRESHOLD,
            malicious_threshold: int = DEFAULT_MALICIOUS_THRESHOLD) -> Analysis:
    """Score a report. `url` is the URL the job asked for (trusted, unlike report.requested_url).

    score = min(100, sum of signal weights); malicious at >= malicious_threshold, suspicious at
    >= suspicious_threshold, else safe. A target that could not be fetched is `unknown` unless the
    URL-level signals alone reach the suspicious threshold.
    """
    if not 1 <= suspicious_threshold < malicious_threshold <= MAX_SCORE:
        raise ValueError("thresholds must satisfy 1 <= suspicious < malicious <= 100")
    checks: dict[str, RuleCheck] = {"blocklist_hit": partial(blocklist_hit, blocklist=blocklist),
                                    **_CHECKS}
    signals = [s for name, check in checks.items() for s in _run(name, check, url, report)]
    score = _score(signals)
    verdict = _classify(score, suspicious_threshold, malicious_threshold)
    if not _fetched(report):
        url_score = _score(s for s in signals if RULES[s.name].url_level)
        if url_score < suspicious_threshold:
            verdict = Verdict.UNKNOWN
    return Analysis(verdict=verdict, score=score, signals=signals,
                    analyzer_version=ANALYZER_VERSION)
