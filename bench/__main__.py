"""`python -m bench`: the whole benchmark in one go, on this machine's Redis and PostgreSQL.

  1. worker overhead (no containers) vs saq, arq and Celery running a no-op task
  2. the container path vs the same fetcher image run by parallel `docker run --rm` loops
  3. recovery: SIGKILL a replica holding jobs, time until each job runs again elsewhere
  4. footprint: worker RSS and CPU per job at concurrency 50 (from part 1)
  5. scale-out: 1, 2 and 4 replicas on the no-op path, with the CPU split by process
  6. latency: submit -> terminal of one scan on an idle worker vs `docker run --rm` (latency.py)
  7. render scans/s vs static scans/s at concurrency 1 and 4, through the worker (render.py)
  8. lanes: interactive latency under a bulk flood, with lanes and in one lane (lanes.py)
Every part runs its systems in alternating rounds (A B C A B C ...) and prints each figure, and
each ratio (computed within a round), as `median (min-max)` over the rounds. Writes every round
to docs/bench/results.json and the medians with their ranges to docs/bench/results.png.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from . import competitors, lanes, latency, render
from .harness import alternate, cpu_by_role, percentile, ratios, show, spawn, summarize
from .ours import enqueue, run_ours, running, start_worker, wait_completed

ROOT = Path(__file__).resolve().parent.parent
FETCHER_IMAGE = os.environ.get("FETCHER_IMAGE", "safeurl-fetcher:latest")
T = TypeVar("T")


def sh(*cmd: str, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout.strip()


def _rounds(n: int, runs: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """Alternating rounds of `runs` (each returns a dict of figures) with their spread."""
    rounds = alternate(n, runs)
    return {"rounds": rounds, "summary": summarize(rounds)}


def _sync(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """One run of an async part on its own uvloop (each round starts from a fresh loop)."""
    return uvloop.run(fn(*args))


def _no_op_round(a: argparse.Namespace, system: str) -> dict[str, Any]:
    return dataclasses.asdict(
        _sync(run_ours, a.jobs, a.concurrency, a.redis_url) if system == "safeurl"
        else competitors.run_system(system, a.jobs, a.concurrency, a.redis_url))


def part1(a: argparse.Namespace) -> dict[str, Any]:
    res = _rounds(a.rounds, {s: functools.partial(_no_op_round, a, s)
                             for s in ["safeurl", *a.systems.split(",")] if s})
    return {"jobs": a.jobs, "concurrency": a.concurrency, **res,
            "ours_ratio": ratios(res["rounds"], "safeurl", "jobs_per_s")}


# --- part 2 ---------------------------------------------------------------------------------

@dataclasses.dataclass
class TestHost:
    network: str
    subnet: str
    container: str

    @classmethod
    def start(cls) -> TestHost:
        name = f"safeurl-bench-{uuid.uuid4().hex[:6]}"
        sh("docker", "network", "create", "--internal", name)
        sh("docker", "run", "-d", "--name", f"{name}-host", "--network", name,
           "--network-alias", "site-a.test", "--user", "0", "--entrypoint", "python3",
           "-v", f"{ROOT / 'tests' / 'testhost'}:/srv:ro", FETCHER_IMAGE, "/srv/server.py", "80")
        sh("docker", "exec", f"{name}-host", "python3", "-c",
           "import time,urllib.request\nfor _ in range(100):\n  try:\n"
           "    urllib.request.urlopen('http://127.0.0.1/',timeout=1);break\n"
           "  except OSError: time.sleep(0.1)")
        subnet = sh("docker", "network", "inspect", name, "-f",
                    "{{(index .IPAM.Config 0).Subnet}}")
        return cls(name, subnet, f"{name}-host")

    def stop(self) -> None:
        sh("docker", "rm", "-f", self.container, check=False)
        sh("docker", "network", "rm", self.network, check=False)


def docker_run_rate(host: TestHost, scans: int, concurrency: int) -> dict[str, float]:
    """The physical limit: `concurrency` parallel `docker run --rm` loops of the same image."""
    script = ("for i in $(seq {n}); do docker run --rm --network {net} -e FETCH_ALLOW_CIDRS={c} "
              "-e FETCH_ALLOWED_PORTS=80 {img} http://site-a.test/ >/dev/null; done")
    t0 = time.monotonic()
    procs = [subprocess.Popen(["bash", "-c", script.format(
        n=n, net=host.network, c=host.subnet, img=FETCHER_IMAGE)])
        for i in range(concurrency) if (n := scans // concurrency + (i < scans % concurrency))]
    for p in procs:
        p.wait(timeout=900)
    return {"scans_per_s": scans / (time.monotonic() - t0)}


async def worker_rate(host: TestHost, scans: int, concurrency: int,
                      redis_url: str) -> dict[str, float]:
    """Our worker with the real Docker runner on the same page."""
    async with running(redis_url, lambda env: [spawn(
            [str(Path(sys.executable).parent / "safeurl-worker"), "run"],
            env.worker_env("bench-docker", concurrency, FETCHER_NETWORK=host.network,
                           FETCH_ALLOW_CIDRS=host.subnet, FETCH_ALLOWED_PORTS="80",
                           FETCHER_IMAGE=FETCHER_IMAGE), Path(f"/tmp/{env.stream}.log"))],
            ) as (env, r, pool, _):
        t0 = time.time()
        await enqueue(pool, r, env.stream, scans, url="http://site-a.test/")
        return {"scans_per_s": scans / (await wait_completed(pool, scans, 900) - t0)}


def part2(a: argparse.Namespace) -> dict[str, Any]:
    host = TestHost.start()
    levels = []
    try:
        for c in map(int, a.container_concurrency.split(",")):
            res = _rounds(a.rounds, {
                "docker_run": functools.partial(docker_run_rate, host, a.scans, c),
                "worker": functools.partial(_sync, worker_rate, host, a.scans, c, a.redis_url)})
            levels.append({"concurrency": c, **res,
                           "ratio": ratios(res["rounds"], "worker", "scans_per_s")["docker_run"]})
    finally:
        host.stop()
    return {"scans": a.scans, "levels": levels}


# --- part 3 ---------------------------------------------------------------------------------

async def recovery(jobs: int, redis_url: str, job_seconds: float) -> dict[str, Any]:
    """Two replicas with default leases; jobs take `job_seconds`; SIGKILL the first holder."""
    async with running(redis_url, lambda env: [start_worker(env, w, 4, delay_s=job_seconds)
                                               for w in ("rec-a", "rec-b")]) as (env, r, pool, ps):
        await enqueue(pool, r, env.stream, jobs)
        held: list[Any] = []
        deadline = time.monotonic() + 60
        while len(held) < 2 and time.monotonic() < deadline:
            held = await r.xpending_range(env.stream, "scan-workers", min="-", max="+",
                                          count=100, consumername="rec-a")
            await asyncio.sleep(0.05)
        killed_at = time.time()
        ps[0].send_signal(signal.SIGKILL)
        ps[0].wait()
        job_ids = []
        for h in held:
            entries: Any = await r.xrange(env.stream, min=h["message_id"], max=h["message_id"])
            job_ids += [uuid.UUID(fields[b"job_id"].decode()) for _, fields in entries]
        deadline = time.monotonic() + 120
        times: list[float] = []
        while time.monotonic() < deadline and len(times) < len(job_ids):
            rows = await pool.fetch(
                "SELECT job_id, min(extract(epoch FROM at)) AS t FROM scan_audit_log "
                "WHERE job_id = ANY($1::uuid[]) AND worker_id = 'rec-b' GROUP BY job_id",
                job_ids)
            times = [float(x["t"]) - killed_at for x in rows]
            await asyncio.sleep(0.2)
        return {"jobs_held": len(job_ids), "restarted": len(times),
                "p50_s": percentile(times, 0.5) if times else None,
                "max_s": max(times, default=None), "lease_timeout_s": 15.0}


def part3(a: argparse.Namespace) -> dict[str, Any]:
    # With headroom (6 jobs, 2 x 4 slots: the survivor has free slots) and saturated (40 jobs:
    # a reclaimed job waits for a free slot, at most one job's length).
    return _rounds(a.rounds, {c: functools.partial(_sync, recovery, n, a.redis_url, 5.0)
                              for c, n in (("headroom", 6), ("saturated", 40))})


# --- part 5 ---------------------------------------------------------------------------------

ROLES = {"worker": lambda p: "bench.ours worker" in p.cmdline,
         "postgres": lambda p: p.comm == "postgres", "redis": lambda p: p.comm.startswith("redis")}


def scale_out(a: argparse.Namespace, replicas: int) -> dict[str, Any]:
    """Throughput, and where the cores went (CPU seconds per process role over the run, read
    from /proc while every process of the run is still alive)."""
    before, producer0, t0 = cpu_by_role(ROLES), sum(os.times()[:2]), time.monotonic()
    after: dict[str, float] = {}

    def done() -> None:
        wall = time.monotonic() - t0
        after.update({k: (v - before[k]) / wall for k, v in cpu_by_role(ROLES).items()},
                     producer=(sum(os.times()[:2]) - producer0) / wall)

    res = uvloop.run(run_ours(a.jobs, a.concurrency, a.redis_url, replicas=replicas, on_done=done))
    return {"jobs_per_s": res.jobs_per_s, **{f"cores_{k}": v for k, v in after.items()}}


def part5(a: argparse.Namespace) -> dict[str, Any]:
    return {"cores": os.cpu_count(), **_rounds(a.rounds, {
        n: functools.partial(scale_out, a, int(n)) for n in a.replicas.split(",")})}


# --- part 6 ---------------------------------------------------------------------------------

def part6(a: argparse.Namespace) -> dict[str, Any]:
    host = TestHost.start()
    try:
        args = (host.network, host.subnet, FETCHER_IMAGE, a.latency_scans)
        res = _rounds(a.rounds, {
            "worker": functools.partial(_sync, latency.worker_latency, *args, a.redis_url),
            "docker_run": functools.partial(latency.docker_run_latency, *args),
            **{mode: functools.partial(_sync, latency.worker_latency, *args, a.redis_url, mode)
               for mode in ("worker_created", "worker_cold")}})
    finally:
        host.stop()
    # Each of our modes against `docker run --rm`, per round (the target is worker <= 0.75x).
    return {"scans": a.latency_scans, "pause_s": latency.PAUSE_S, **res,
            "ratio": {m: ratios(res["rounds"], m, "p50_ms")["docker_run"]
                      for m in res["summary"] if m != "docker_run"}}


# --- part 7 ---------------------------------------------------------------------------------

def part7(a: argparse.Namespace) -> dict[str, Any]:
    image = os.environ.get("BROWSER_IMAGE", "safeurl-browser:latest")
    sh("docker", "image", "inspect", image)  # fails early, naming the missing image
    host = render.RenderHost(sh, FETCHER_IMAGE)
    levels = []
    try:
        for c in map(int, a.render_concurrency.split(",")):
            n = a.render_scans * c
            res = _rounds(a.rounds, {mode: functools.partial(
                _sync, render.scan_rate, host, mode, n, c, a.redis_url)
                for mode in ("static", "render")})
            levels.append({"concurrency": c, "scans": n, **res,
                           "ratio": ratios(res["rounds"], "render", "scans_per_s")["static"]})
    finally:
        host.stop()
    return {"page": render.PAGE, "levels": levels}


# --- report ---------------------------------------------------------------------------------

def table(res: dict[str, Any]) -> str:
    w, lines = 19, []  # + 1 space: a wide cell never runs into the next
    if p := res.get("part1"):
        lines += [f"1. no-op path, {p['jobs']} jobs, concurrency {p['concurrency']}, "
                  f"{len(p['rounds'])} rounds: median (min-max)",
                  "   " + "".join(f"{h:<{w}} " for h in ("system", "jobs/s", "p50 ms", "p95 ms",
                                                       "p99 ms", "ours/x"))]
        for name, s in p["summary"].items():
            ratio = show(p["ours_ratio"][name], ".2f") if name in p["ours_ratio"] else "-"
            lines.append("   " + "".join(f"{c:<{w}} " for c in (name, *(
                show(s[k]) for k in ("jobs_per_s", "p50_ms", "p95_ms", "p99_ms")), ratio)))
        ours = p["summary"]["safeurl"]
        lines.append(f"4. footprint at concurrency {p['concurrency']}: RSS "
                     f"{show(ours['rss_mb'])} MB, CPU {show(ours['cpu_ms_per_job'], '.2f')} ms/job")
    if p := res.get("part2"):
        head = f"2. container path, {p['scans']} scans/level (scans/s)"
        lines.append(f"{head:<45}" + "".join(
            f"{h:<{w}} " for h in ("concurrency", "worker", "docker-run", "ratio")))
        for lv in p["levels"]:
            s = lv["summary"]
            lines.append(" " * 45 + "".join(f"{c:<{w}} " for c in (
                str(lv["concurrency"]), show(s["worker"]["scans_per_s"], ".2f"),
                show(s["docker_run"]["scans_per_s"], ".2f"), show(lv["ratio"], ".2f"))))
    if p := res.get("part3"):
        for case, s in p["summary"].items():
            held = sum(r[case]["jobs_held"] for r in p["rounds"])
            back = sum(r[case]["restarted"] for r in p["rounds"])
            lines.append(f"3. recovery after SIGKILL ({case}, 5 s jobs, {len(p['rounds'])} rounds):"
                         f" {back}/{held} jobs restarted, p50 {show(s['p50_s'], '.1f')} s, "
                         f"max {show(s['max_s'], '.1f')} s (lease 15 s)")
    if p := res.get("part5"):
        lines.append(f"{'5. scale-out (no-op path)':<27}{'replicas':>9}  {'jobs/s':<{w}} "
                     "cores used: workers / postgres / redis / producer")
        for n, s in p["summary"].items():
            lines.append(f"{n:>36}  {show(s['jobs_per_s']):<{w}} " + " / ".join(
                show(s[f"cores_{k}"], ".2f") for k in ("worker", "postgres", "redis", "producer")))
    if p := res.get("part6"):
        lines += [f"6. latency submit -> terminal, idle worker, {p['scans']} sequential scans x "
                  f"{len(p['rounds'])} rounds: median (min-max)",
                  "   " + "".join(f"{h:<{w}} " for h in ("system", "p50 ms", "p99 ms",
                                                       "p50 / docker run"))]
        for name, s in p["summary"].items():
            ratio = show(p["ratio"][name], ".2f") if name in p["ratio"] else "-"
            lines.append("   " + "".join(f"{c:<{w}} " for c in (
                name, show(s["p50_ms"]), show(s["p99_ms"]), ratio)))
    if p := res.get("part7"):
        lines.append(f"7. render vs static scans/s ({len(p['levels'][0]['rounds'])} rounds): "
                     "median (min-max)")
        lines.append("   " + "".join(f"{h:<{w}} " for h in (
            "concurrency", "scans", "static/s", "render/s", "render/static", "render p50 s+queue")))
        for lv in p["levels"]:
            s = lv["summary"]
            lines.append("   " + "".join(f"{c:<{w}} " for c in (
                str(lv["concurrency"]), str(lv["scans"]), show(s["static"]["scans_per_s"], ".2f"),
                show(s["render"]["scans_per_s"], ".2f"), show(lv["ratio"], ".2f"),
                show(s["render"]["p50_s"], ".1f"))))
    if p := res.get("part8"):
        lines += lanes.table(p, w)
    return "\n".join(line.rstrip() for line in lines)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[str], dict[str, list[dict[str, float]]]]] = []
    if p := res.get("part1"):
        panels.append((f"no-op jobs/s (concurrency {p['concurrency']})", list(p["summary"]),
                       {"": [s["jobs_per_s"] for s in p["summary"].values()]}))
    if p := res.get("part2"):
        panels.append(("container scans/s by concurrency",
                       [str(lv["concurrency"]) for lv in p["levels"]],
                       {label: [lv["summary"][side]["scans_per_s"] for lv in p["levels"]]
                        for side, label in (("worker", "safeurl worker"),
                                            ("docker_run", "docker run --rm loops"))}))
    if p := res.get("part5"):
        panels.append(("scale-out: no-op jobs/s by replicas", list(p["summary"]),
                       {"": [s["jobs_per_s"] for s in p["summary"].values()]}))
    if p := res.get("part7"):
        panels.append(("render vs static scans/s by concurrency",
                       [str(lv["concurrency"]) for lv in p["levels"]],
                       {mode: [lv["summary"][mode]["scans_per_s"] for lv in p["levels"]]
                        for mode in ("static", "render")}))
    if p := res.get("part6"):
        panels.append(("latency: p50 ms, submit -> terminal", list(p["summary"]),
                       {"": [s["p50_ms"] for s in p["summary"].values()]}))
    if p := res.get("part8"):
        panels.append(("latency: interactive p50 ms under a bulk flood", list(p["summary"]),
                       {"": [s["p50_ms"] for s in p["summary"].values()]}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, xs, series) in zip(axes[0], panels, strict=True):
        for label, ss in series.items():
            ys = [s["median"] for s in ss]
            err = [[s["median"] - s["min"] for s in ss], [s["max"] - s["median"] for s in ss]]
            if title.startswith(("no-op", "latency")):
                ax.bar(xs, ys, yerr=err, capsize=4,
                       color=["tab:green"] + ["tab:gray"] * (len(xs) - 1))
            else:
                ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, label=label)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend()
    fig.suptitle(f"SafeURL Worker benchmark ({res['machine']}; median, bars: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per part (>= 3 for "
                    "a spread worth reading)")
    ap.add_argument("--jobs", type=int, default=10_000, help="part 1 and 5 job count")
    ap.add_argument("--concurrency", type=int, default=50, help="part 1 and 5 concurrency")
    ap.add_argument("--scans", type=int, default=200, help="part 2 scans per level")
    ap.add_argument("--container-concurrency", default="1,4,8")
    ap.add_argument("--latency-scans", type=int, default=20, help="part 6 scans per round")
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--render-scans", type=int, default=3,
                    help="part 7 scans per round, per unit of concurrency")
    ap.add_argument("--render-concurrency", default="1,4")
    ap.add_argument("--flood-jobs", type=int, default=300, help="part 8 bulk jobs per round")
    ap.add_argument("--interactive-jobs", type=int, default=20,
                    help="part 8 interactive jobs per round")
    ap.add_argument("--job-seconds", type=float, default=0.2, help="part 8 stub job length")
    ap.add_argument("--lane-systems", default="lanes,one_lane",
                    help=f"part 8 systems, of {','.join(lanes.SYSTEMS)}")
    ap.add_argument("--parts", default="1,2,3,5,6,7,8")
    ap.add_argument("--systems", default="saq,arq,celery")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    ap.add_argument("--merge", action="store_true",
                    help="update the parts run now in an existing results.json")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    res: dict[str, Any] = {"machine": f"{os.cpu_count()} cores",
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.merge and (a.out / "results.json").exists():
        old = json.loads((a.out / "results.json").read_text())
        # Parts written before the rounds existed have no spread to show: not merged.
        res = {**{k: v for k, v in old.items() if not k.startswith("part")
                  or "summary" in v or "levels" in v}, **res}
    for part, run in (("1", part1), ("2", part2), ("3", part3), ("5", part5), ("6", part6),
                      ("7", part7), ("8", lanes.part8)):
        if part in a.parts.split(","):
            res[f"part{part}"] = run(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=2))
    chart(res, a.out / "results.png")
    print(table(res))
    print(f"wrote {a.out / 'results.json'} and {a.out / 'results.png'}")


if __name__ == "__main__":
    main()
