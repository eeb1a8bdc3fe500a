"""Make every report fit the worker's stdout cap, by construction.

The model's bounds count characters, and a hostile page controls the characters: 50 form actions
of 8192 characters that each take 3 bytes in UTF-8 (or 6 as a JSON escape) are far more than
the 1 MiB the worker reads. So the report is built to a byte budget: the fixed part is measured,
the rest of the budget is shared among the variable parts by fixed weights, and each part keeps
items in order while they fit. What was left out is counted in `truncated` (`{"features.images":
41, "headers": 3}`), so a cut is visible instead of becoming OUTPUT_INVALID.
"""

from __future__ import annotations

import copy
import json
from typing import Any

DEFAULT_MAX_OUTPUT = 1024 * 1024
MIN_OUTPUT = 4096
_TRUNCATED_RESERVE = 1024  # room for the `truncated` object itself

# Share of the variable budget per part: what decides a verdict first.
_LIST_WEIGHTS: dict[tuple[str, ...], float] = {
    ("redirects",): 0.12,
    ("features", "forms"): 0.10,
    ("features", "js_redirects"): 0.05,
    ("features", "iframes"): 0.07,
    ("features", "external_scripts"): 0.08,
    ("features", "headings"): 0.03,
    ("features", "buttons"): 0.03,
    ("features", "icons"): 0.03,
    ("features", "images"): 0.08,
    ("features", "stylesheets"): 0.05,
}
_DICT_WEIGHTS: dict[tuple[str, ...], float] = {("headers",): 0.08, ("features", "meta"): 0.04}
_STR_WEIGHTS: dict[tuple[str, ...], float] = {("features", "text"): 0.04,
                                              ("features", "meta_refresh"): 0.02}
# Strings of the fixed part, cut to a share of the whole cap (only a cap far below the default
# ever cuts them: at 1 MiB each share is above its field's largest possible size).
_FIXED_SHARES: dict[tuple[str, ...], float] = {
    ("requested_url",): 1 / 16, ("final_url",): 1 / 16, ("title",): 1 / 32,
    ("content_type",): 1 / 64, ("error", "message"): 1 / 32, ("tls", "error"): 1 / 32,
    ("features", "parse_problem"): 1 / 32,
}


def encoded_size(value: Any) -> int:
    """Bytes of `value` as the fetcher prints it (compact JSON, UTF-8)."""
    return len(dumps(value))


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def cut_to_bytes(text: str, budget: int) -> str:
    """The longest prefix of `text` whose JSON string encoding takes at most `budget` bytes."""
    if encoded_size(text) <= budget:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # binary search: encoded size grows with the prefix
        mid = (lo + hi + 1) // 2
        if encoded_size(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def fit(report: dict[str, Any], cap: int = DEFAULT_MAX_OUTPUT) -> dict[str, Any]:
    """`report` cut so that its encoding plus a newline is at most `cap` bytes."""
    cap = max(cap, MIN_OUTPUT)
    out = copy.deepcopy(report)
    truncated: dict[str, int] = dict(out.pop("truncated", {}) or {})
    for path, share in _FIXED_SHARES.items():
        value = _get(out, path)
        if isinstance(value, str):
            _set(out, path, cut_to_bytes(value, int(cap * share)))
    parts = _take_parts(out)
    available = cap - 1 - encoded_size(out) - _TRUNCATED_RESERVE
    for path, value in parts.items():
        budget = int(max(0, available) * _weight(path))
        kept, dropped = _fit_part(value, budget)
        _set(out, path, kept)
        if dropped:
            key = ".".join(path)
            truncated[key] = truncated.get(key, 0) + dropped
    out["truncated"] = dict(list(truncated.items())[:32])
    if encoded_size(out) + 1 > cap:  # cannot happen with the budget above; never print more
        out = _minimal(out)
    return out


def _weight(path: tuple[str, ...]) -> float:
    return _LIST_WEIGHTS.get(path) or _DICT_WEIGHTS.get(path) or _STR_WEIGHTS.get(path) or 0.0


def _take_parts(out: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """Remove the variable parts from `out` (leaving empty ones) and return them."""
    parts: dict[tuple[str, ...], Any] = {}
    for path in (*_LIST_WEIGHTS, *_DICT_WEIGHTS, *_STR_WEIGHTS):
        value = _get(out, path)
        if value is None:
            continue
        parts[path] = value
        _set(out, path, type(value)())
    return parts


def _fit_part(value: Any, budget: int) -> tuple[Any, int]:
    """(what of `value` fits in `budget` bytes beyond its empty form, items dropped)."""
    if isinstance(value, str):
        kept = cut_to_bytes(value, budget + 2)
        return kept, int(kept != value)
    if isinstance(value, list):
        kept_list: list[Any] = []
        used = 0
        for item in value:
            size = encoded_size(item) + 1  # the comma
            if used + size > budget:
                cut = _shrink(item, budget - used - 1)  # the last one, with shorter strings
                if cut is not None:
                    kept_list.append(cut)
                return kept_list, len(value) - len(kept_list) + int(cut is not None)
            kept_list.append(item)
            used += size
        return kept_list, 0
    kept_dict: dict[str, Any] = {}
    used = 0
    for key, item in value.items():
        size = encoded_size(key) + encoded_size(item) + 2  # colon and comma
        if used + size > budget:
            continue  # a smaller entry later may still fit
        kept_dict[key] = item
        used += size
    return kept_dict, len(value) - len(kept_dict)


def _shrink(item: Any, budget: int) -> Any:
    """`item` with its strings cut so that it takes at most `budget` bytes, or None if even
    its empty form is too big (or too little of it would be left to say anything)."""
    if isinstance(item, str):
        return cut_to_bytes(item, budget) if budget >= 64 else None
    if not isinstance(item, dict):
        return None
    strings = [k for k, v in item.items() if isinstance(v, str)]
    empty = {k: ("" if k in strings else v) for k, v in item.items()}
    share = (budget - encoded_size(empty)) // max(1, len(strings))
    if share < 32:
        return None
    cut = {k: (cut_to_bytes(v, share + 2) if k in strings else v) for k, v in item.items()}
    return cut if encoded_size(cut) <= budget else None


def _minimal(out: dict[str, Any]) -> dict[str, Any]:
    keep = ("schema_version", "fetcher_version", "requested_url", "final_url", "http_status",
            "body_size", "body_truncated", "sha256", "error")
    return {k: out[k] for k in keep if k in out} | {"truncated": {"report": 1}}


def _get(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)  # type: ignore[assignment]
    return obj


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
