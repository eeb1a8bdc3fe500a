"""The sandboxed fetcher: fetch one URL without SSRF and print one JSON report.

The standard library plus a few wheels unpacked into the image (scripts/build-images.sh). In the
image this package is `/app/fetcher` (`python3 -m fetcher URL`); in the worker and tests it is
`safeurl_worker.fetcher`, so modules import each other relatively.

Public API:
    weburl.parse(url, base=None) -> WebUrl                    (browser URL parsing; WebUrlError)
    weburl.join(base, ref) -> str | None                      (browser relative resolution)
    netcheck.check_url(url, allowed_ports, allow_cidrs, resolver=...) -> CheckResult
    netcheck.address_block_reason(ip, allow) -> str | None
    netcheck.parse_url(url) -> ParsedUrl                      (raises UrlError)
    fetch.run(url, env) -> dict                               (the report; never raises)
    content.decode_content / is_html / decode_html            (body bytes -> the page's text)
    htmlscan.scan_html(text, url, budget_s) -> PageFeatures   (bounded; parse full/partial)
    reportfit.fit(report, cap) -> dict                        (the report within the stdout cap)
"""

from .fetch import FETCHER_VERSION, FetchConfig, run
from .netcheck import CheckResult, ParsedUrl, UrlError, address_block_reason, check_url, parse_url

__all__ = [
    "FETCHER_VERSION",
    "CheckResult",
    "FetchConfig",
    "ParsedUrl",
    "UrlError",
    "address_block_reason",
    "check_url",
    "parse_url",
    "run",
]
