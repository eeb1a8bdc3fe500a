"""The sandboxed fetcher: fetch one URL without SSRF and print one JSON report.

Stdlib only. In the image this package is `/app/fetcher` (`python3 -m fetcher URL`); in the worker
and tests it is `safeurl_worker.fetcher`, so modules import each other relatively.

Public API:
    netcheck.check_url(url, allowed_ports, allow_cidrs, resolver=...) -> CheckResult
    netcheck.address_block_reason(ip, allow) -> str | None
    netcheck.parse_url(url) -> ParsedUrl                      (raises UrlError)
    fetch.run(url, env) -> dict                               (the report; never raises)
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
