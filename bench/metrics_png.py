"""Render a running worker's /metrics as a PNG (for the README: real data, no Grafana needed).

  python -m bench.metrics_png http://127.0.0.1:9400/metrics docs/img/metrics.png
"""

from __future__ import annotations

import sys
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[str, dict[str, float]]:
    """{metric sample name: {label text: value}} for the safeurl_* samples."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("safeurl_") and not s.name.endswith("_created"):
                label = ",".join(f"{v}" for k, v in s.labels.items() if k != "le") or "all"
                if s.name.endswith("_bucket"):
                    label += f" le={s.labels['le']}"
                out[s.name][label] = s.value
    return out


def quantile(buckets: dict[str, float], stage: str, q: float) -> float:
    pts = sorted((float(k.split("le=")[1]), v) for k, v in buckets.items()
                 if k.startswith(stage + " "))
    if not pts or pts[-1][1] == 0:
        return 0.0
    target = pts[-1][1] * q
    prev_le, prev_n = 0.0, 0.0
    for le, n in pts:
        if n >= target:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (target - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le


def main() -> None:
    url, path = sys.argv[1], sys.argv[2]
    m = scrape(url)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("safeurl_jobs_total", "jobs by outcome"),
              ("safeurl_verdicts_total", "verdicts"),
              ("safeurl_container_runs_total", "container runs by result")]
    for ax, (name, title) in zip(axes, panels, strict=False):
        data = m.get(name, {})
        ax.bar(list(data), list(data.values()), color="tab:blue")
        ax.set_title(title)
        for i, v in enumerate(data.values()):
            ax.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom")
    buckets = m.get("safeurl_job_duration_seconds_bucket", {})
    stages = ["queue_wait", "fetch", "analyze", "total"]
    for q, style in ((0.5, "o-"), (0.95, "s--")):
        axes[3].plot(stages, [quantile(buckets, s, q) for s in stages], style,
                     label=f"p{q * 100:.0f}")
    axes[3].set_yscale("log")
    axes[3].set_title("stage latency (s)")
    axes[3].legend()
    fig.suptitle(f"safeurl-worker /metrics after a real run ({url})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
