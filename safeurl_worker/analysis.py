"""Turn a fetcher report into a verdict: the registered rules (rules.py), each contributing
weighted signals, and how much of the page was actually seen (confidence).

Everything here is a pure function of (requested URL, report, blocklist, brand catalogue, and for
a render scan the static report of the same URL). The
report is untrusted (it was produced next to hostile content), so every URL in it is parsed
defensively: a URL that does not parse simply contributes nothing, it never raises.

See docs/analysis.md for the rule table, the weights and the reasoning behind them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .blocklist import Blocklist
from .brands import Catalogue, shipped_catalogue
from .models import Analysis, Features, Report, Signal, Verdict
from .rules import (
    ANALYZER_VERSION,
    DEFAULT_MALICIOUS_THRESHOLD,
    DEFAULT_SUSPICIOUS_THRESHOLD,
    MAX_SCORE,
    RULES,
    Context,
    Rule,
)

log = logging.getLogger(__name__)

# A "safe" below this confidence is reported as "unknown": we did not see enough to say so.
MIN_SAFE_CONFIDENCE = 0.5

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


def _run(name: str, rule: Rule, ctx: Context) -> list[Signal]:
    """One rule; a bug in one rule must not lose the whole verdict."""
    try:
        return list(rule.check(ctx))
    except Exception:
        log.exception("analysis rule %s failed", name)
        return []


# --- how much was seen ----------------------------------------------------------------------

_HTMLISH = ("html", "xml")


def _htmlish(report: Report) -> bool:
    """A response a browser would render as a page (or that came without a type)."""
    ctype = (report.content_type or "").lower()
    return any(t in ctype for t in _HTMLISH) or (not ctype and report.body_size > 0)


def _seen(f: Features, title: str | None) -> int:
    """How many kinds of page content the fetcher saw (0: nothing at all)."""
    parts = [title, f.text, f.forms, f.iframes, f.external_scripts, f.headings, f.images,
             f.stylesheets, f.buttons, f.icons, f.js_redirects, f.meta_refresh,
             f.scripts.inline_count, f.links_count]
    return sum(1 for p in parts if p)


def confidence(report: Report) -> float:
    """0..1: how much of the page the verdict rests on.

    0 when nothing was fetched; low when an HTML response could not be parsed or nothing at
    all was seen in it; reduced when the parse stopped at a bound; a non-HTML response is
    judged on its type and name only."""
    if not _fetched(report):
        return 0.0
    f = report.features
    seen = _seen(f, report.title)
    if not _htmlish(report):
        return 0.6 if report.body_size or report.content_type else 0.2
    if not seen:
        return 0.1 if f.parse == "none" else 0.2
    # "none" with content seen: a fetcher too old to report its parse status; an error with
    # an HTTP status: the body was cut short (a read deadline, a size cap).
    if f.parse != "full" or report.body_truncated or report.error is not None:
        return 0.7 if seen >= 2 else 0.4
    if any(k.startswith("features.forms") for k in report.truncated):
        return 0.7  # forms were left out to fit the report: the verdict saw only some
    return 1.0


def analyze(url: str, report: Report, *, blocklist: Blocklist | None = None,
            catalogue: Catalogue | None = None,
            suspicious_threshold: int = DEFAULT_SUSPICIOUS_THRESHOLD,
            malicious_threshold: int = DEFAULT_MALICIOUS_THRESHOLD,
            static: Report | None = None) -> Analysis:
    """Score a report. `url` is the URL the job asked for (trusted, unlike report.requested_url);
    `catalogue` is the worker's brand catalogue (the shipped one when None). For a render scan
    (`report.render`), `static` is the static fetch of the same URL, if it produced a report.

    score = min(100, sum of signal weights); malicious at >= malicious_threshold, suspicious at
    >= suspicious_threshold, else safe. A target that could not be fetched is `unknown` unless
    the signals that count without a fetch (blocklist, URL-level, a refused redirect) reach the
    suspicious threshold; a page that was fetched but not seen (unparsable, empty) is `unknown`
    rather than `safe`. `confidence` says how much of the page the verdict rests on.
    """
    if not 1 <= suspicious_threshold < malicious_threshold <= MAX_SCORE:
        raise ValueError("thresholds must satisfy 1 <= suspicious < malicious <= 100")
    ctx = Context(url=url, report=report, blocklist=blocklist,
                  catalogue=catalogue if catalogue is not None else shipped_catalogue(),
                  static=static)
    signals = [s for name, rule in RULES.items() for s in _run(name, rule, ctx)]
    score = _score(signals)
    verdict = _classify(score, suspicious_threshold, malicious_threshold)
    conf = confidence(report)
    if not _fetched(report):
        url_score = _score(s for s in signals if RULES[s.name].url_level)
        if url_score < suspicious_threshold:
            verdict = Verdict.UNKNOWN
    if verdict is Verdict.SAFE and conf < MIN_SAFE_CONFIDENCE:
        verdict = Verdict.UNKNOWN
    if verdict in (Verdict.SUSPICIOUS, Verdict.MALICIOUS):
        conf = max(conf, 0.5)  # the signals themselves were seen
    return Analysis(verdict=verdict, score=score, signals=signals,
                    analyzer_version=ANALYZER_VERSION, confidence=round(conf, 2))
