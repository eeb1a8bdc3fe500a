"""What every part of `python -m bench` shares: the result type, the percentile, the /proc
reader, and the alternating rounds with their spread (median, min, max)."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")
_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`values` need not be sorted; at least one value)."""
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


@dataclasses.dataclass(frozen=True)
class Proc:
    comm: str
    cmdline: str
    cpu_s: float  # user + system, so far
    rss_mb: float


def read_proc(pid: int) -> Proc | None:
    """One process from /proc; None if it is gone (or not ours to read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    rss_kb = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
    return Proc(stat[stat.index("(") + 1:stat.rindex(")")], cmdline,
                (int(fields[11]) + int(fields[12])) / _TICKS, rss_kb / 1024)


def cpu_by_role(roles: dict[str, Callable[[Proc], bool]]) -> dict[str, float]:
    """CPU seconds so far of every process on the machine, summed by the first role it fits."""
    out = dict.fromkeys(roles, 0.0)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        p = read_proc(int(pid))
        role = next((r for r, fits in roles.items() if p and fits(p)), None)
        if p and role:
            out[role] += p.cpu_s
    return out


@dataclasses.dataclass(frozen=True)
class Result:
    """One system, one round: throughput over the run, latency enqueue -> completion."""

    system: str
    jobs: int
    concurrency: int
    seconds: float  # first enqueue -> last completion
    jobs_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rss_mb: float = 0.0  # the largest worker process (ours: peak over the run)
    cpu_ms_per_job: float = 0.0  # worker process(es)
    notes: str = ""

    @classmethod
    def of(cls, system: str, concurrency: int, latencies_ms: Sequence[float], seconds: float,
           rss_mb: float = 0.0, cpu_s: float = 0.0, notes: str = "") -> Result:
        n = len(latencies_ms)
        return cls(system, n, concurrency, seconds, n / seconds, percentile(latencies_ms, 0.5),
                   percentile(latencies_ms, 0.95), percentile(latencies_ms, 0.99), rss_mb,
                   cpu_s * 1000 / n, notes)


def alternate(rounds: int, runs: dict[str, Callable[[], T]]) -> list[dict[str, T]]:
    """A B C A B C ...: each round runs every system once, so that a slow spell of the shared
    machine hits all of them rather than one."""
    out: list[dict[str, T]] = []
    for i in range(rounds):
        row: dict[str, T] = {}
        for name, run in runs.items():
            print(f"  round {i + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            row[name] = run()
        out.append(row)
    return out


def spread(values: Iterable[float]) -> dict[str, float]:
    """How much a figure moved over the rounds."""
    v = list(values)
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def show(s: dict[str, float], fmt: str = ".0f") -> str:
    """`median (min-max)`."""
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


Rounds = list[dict[str, dict[str, Any]]]  # round -> system -> figure -> value


def summarize(rounds: Rounds) -> dict[str, dict[str, dict[str, float]]]:
    """system -> figure -> spread over the rounds, for every numeric figure."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in rounds[0]:
        values: dict[str, list[float]] = {}
        for r in rounds:
            for k, v in r[name].items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    values.setdefault(k, []).append(v)
        out[name] = {k: spread(v) for k, v in values.items()}
    return out


def ratios(rounds: Rounds, ours: str, figure: str) -> dict[str, dict[str, float]]:
    """ours / x for every other system, computed within each round, then spread."""
    return {name: spread(r[ours][figure] / r[name][figure] for r in rounds)
            for name in rounds[0] if name != ours}


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A worker process, started in the repository root, its output in `log`."""
    out: IO[bytes] = log.open("wb")  # the child holds its own copy of the descriptor
    with out:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)


def stop(procs: Iterable[subprocess.Popen[Any]], grace_s: float = 15) -> None:
    """SIGTERM all, then wait (SIGKILL whoever outlives the grace)."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
