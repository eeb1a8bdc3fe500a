"""`python -m bench`: the whole benchmark in one go, on this machine's Redis and PostgreSQL.

  1. worker overhead (no containers) vs saq, arq and Celery running a no-op task
  2. the container path vs the same fetcher image run by parallel `docker run --rm` loops
  3. recovery: SIGKILL a replica holding jobs, time until each job runs again elsewhere
  4. footprint: worker RSS and CPU per job at concurrency 50 (from part 1)
  5. scale-out: 1, 2 and 4 replicas on the no-op path, with the CPU split by process
Prints one table and writes docs/bench/results.json and docs/bench/results.png.
Every count and duration is bounded by the arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis
import uvloop

from safeurl_worker.store import create_pool

from .ours import BenchEnv, _pct, enqueue, run_ours, start_worker, wait_consumers

ROOT = Path(__file__).resolve().parent.parent
FETCHER_IMAGE = os.environ.get("FETCHER_IMAGE", "safeurl-fetcher:latest")


def sh(*cmd: str, check: bool = True) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout.strip()


# --- resource accounting (part 5) -----------------------------------------------------------

def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of the processes that share the machine, grouped by role."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        role = ("postgres" if comm == "postgres" else "redis" if comm.startswith("redis")
                else "worker" if "bench.ours worker" in cmd else None)
        if role:
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


# --- part 1 ---------------------------------------------------------------------------------

def part1(jobs: int, concurrency: int, redis_url: str, systems: list[str]) -> dict[str, Any]:
    from . import competitors

    ours = uvloop.run(run_ours(jobs, concurrency, redis_url))
    rows = [dataclasses.asdict(ours)]
    runners: dict[str, Callable[..., Any]] = {"saq": competitors.run_saq,
                                              "arq": competitors.run_arq,
                                              "celery": competitors.run_celery}
    for name in systems:
        res = runners[name](jobs, concurrency, redis_url)
        row = dataclasses.asdict(res)
        row["ours_ratio"] = ours.jobs_per_s / res.jobs_per_s
        rows.append(row)
    return {"jobs": jobs, "concurrency": concurrency, "rows": rows}


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


def raw_docker_rate(host: TestHost, scans: int, concurrency: int) -> float:
    """The physical limit: `concurrency` parallel `docker run --rm` loops of the same image."""
    per_loop = [scans // concurrency + (1 if i < scans % concurrency else 0)
                for i in range(concurrency)]
    script = ("for i in $(seq {n}); do docker run --rm --network {net} -e FETCH_ALLOW_CIDRS={c} "
              "-e FETCH_ALLOWED_PORTS=80 {img} http://site-a.test/ >/dev/null; done")
    t0 = time.monotonic()
    procs = [subprocess.Popen(["bash", "-c", script.format(n=n, net=host.network, c=host.subnet,
                                                            img=FETCHER_IMAGE)])
             for n in per_loop if n]
    for p in procs:
        p.wait(timeout=900)
    return scans / (time.monotonic() - t0)


def _docker_worker(env: BenchEnv, host: TestHost, concurrency: int) -> subprocess.Popen[bytes]:
    extra = {"FETCHER_NETWORK": host.network, "FETCH_ALLOW_CIDRS": host.subnet,
             "FETCH_ALLOWED_PORTS": "80", "FETCHER_IMAGE": FETCHER_IMAGE}
    log = open(f"/tmp/{env.stream}.log", "wb")  # noqa: SIM115 - lives with the process
    return subprocess.Popen([str(Path(sys.executable).parent / "safeurl-worker"), "run"],
                            env=env.worker_env("bench-docker", concurrency, **extra),
                            stdout=log, stderr=subprocess.STDOUT)


async def worker_rate(host: TestHost, scans: int, concurrency: int, redis_url: str) -> float:
    """Our worker with the real Docker runner on the same page."""
    env = await BenchEnv.create(redis_url)
    r = redis.Redis.from_url(redis_url)
    pool = await create_pool(env.dsn, 2)
    p = _docker_worker(env, host, concurrency)
    try:
        await wait_consumers(r, env, 1)
        t0 = time.time()
        ids = [uuid.uuid4() for _ in range(scans)]
        await pool.executemany("INSERT INTO scan_jobs (id, url) VALUES ($1, 'http://site-a.test/')",
                               [(i,) for i in ids])
        for i in ids:
            await r.xadd(env.stream, {"job_id": str(i)})
        deadline = time.monotonic() + 900
        while await pool.fetchval("SELECT count(*) FROM scan_jobs WHERE state = 'COMPLETED'") \
                < scans:
            if time.monotonic() > deadline:
                raise RuntimeError("container benchmark did not finish in 900 s")
            await asyncio.sleep(0.1)
        t1 = float(await pool.fetchval("SELECT extract(epoch FROM max(finished_at)) "
                                       "FROM scan_jobs"))
        return scans / (t1 - t0)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        await pool.close()
        await r.aclose()
        await env.drop()


def part2(scans: int, levels: list[int], redis_url: str) -> dict[str, Any]:
    host = TestHost.start()
    rows = []
    try:
        for c in levels:
            raw = raw_docker_rate(host, scans, c)
            ours = uvloop.run(worker_rate(host, scans, c, redis_url))
            rows.append({"concurrency": c, "scans": scans, "worker_scans_per_s": ours,
                         "docker_run_scans_per_s": raw, "ratio": ours / raw})
    finally:
        host.stop()
    return {"rows": rows}


# --- part 3 ---------------------------------------------------------------------------------

async def recovery(jobs: int, redis_url: str, job_seconds: float) -> dict[str, Any]:
    """Two replicas with default leases; jobs take `job_seconds`; SIGKILL the first holder."""
    env = await BenchEnv.create(redis_url)
    r = redis.Redis.from_url(redis_url)
    pool = await create_pool(env.dsn, 2)
    procs = {w: start_worker(env, w, 4, delay_s=job_seconds) for w in ("rec-a", "rec-b")}
    try:
        await wait_consumers(r, env, 2)
        await enqueue(pool, r, env.stream, jobs)
        held: list[Any] = []
        deadline0 = time.monotonic() + 60
        while len(held) < 2 and time.monotonic() < deadline0:
            held = await r.xpending_range(env.stream, "scan-workers", min="-", max="+",
                                          count=100, consumername="rec-a")
            await asyncio.sleep(0.05)
        killed_at = time.time()
        procs["rec-a"].send_signal(signal.SIGKILL)
        procs["rec-a"].wait()
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
            times = sorted(float(x["t"]) - killed_at for x in rows)
            await asyncio.sleep(0.2)
        return {"jobs_held": len(job_ids), "restarted": len(times),
                "p50_s": _pct(times, 0.5) if times else None,
                "max_s": max(times) if times else None,
                "lease_timeout_s": 15.0, "target_s": 16.0}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        await pool.close()
        await r.aclose()
        await env.drop()


# --- part 5 ---------------------------------------------------------------------------------

def part5(jobs: int, concurrency: int, redis_url: str, replicas: list[int]) -> dict[str, Any]:
    """Throughput by replica count, and where the cores went (CPU seconds per process role
    over the run, read from /proc while every process of the run is still alive)."""
    rows = []
    for n in replicas:
        before = cpu_by_process()
        producer0 = sum(os.times()[:2])
        t0 = time.monotonic()
        snap: dict[str, Any] = {}

        def done(snap: dict[str, Any] = snap, t0: float = t0, p0: float = producer0) -> None:
            snap["cpu"], snap["wall"] = cpu_by_process(), time.monotonic() - t0
            snap["producer"] = sum(os.times()[:2]) - p0

        res = uvloop.run(run_ours(jobs, concurrency, redis_url, replicas=n, on_done=done))
        used = {k: (snap["cpu"].get(k, 0) - before.get(k, 0)) / snap["wall"]
                for k in ("worker", "postgres", "redis")}
        used["producer"] = snap["producer"] / snap["wall"]
        rows.append({"replicas": n, "jobs_per_s": res.jobs_per_s,
                     "cores_used": {k: round(v, 2) for k, v in used.items()}})
    return {"rows": rows, "cores": os.cpu_count()}


# --- report ---------------------------------------------------------------------------------

def table(res: dict[str, Any]) -> str:
    lines = []
    if "part1" in res:
        p = res["part1"]
        lines.append(f"1. no-op path, {p['jobs']} jobs, concurrency {p['concurrency']}")
        lines.append(f"   {'system':<9}{'jobs/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
                     f"{'ours/x':>8}")
        for row in p["rows"]:
            ratio = f"{row['ours_ratio']:.2f}" if "ours_ratio" in row else "-"
            lines.append(f"   {row['system']:<9}{row['jobs_per_s']:>9.0f}{row['p50_ms']:>9.0f}"
                         f"{row['p95_ms']:>9.0f}{row['p99_ms']:>9.0f}{ratio:>8}")
        ours = p["rows"][0]
        lines.append(f"4. footprint at concurrency {p['concurrency']}: RSS "
                     f"{ours['rss_mb']:.0f} MB, CPU {ours['cpu_ms_per_job']:.2f} ms/job")
    if "part2" in res:
        lines.append("2. container path (scans/s)  concurrency  worker  docker-run  ratio")
        for row in res["part2"]["rows"]:
            lines.append(f"   {'':<26}{row['concurrency']:>11}{row['worker_scans_per_s']:>8.2f}"
                         f"{row['docker_run_scans_per_s']:>12.2f}{row['ratio']:>7.2f}")
    for case, p3 in res.get("part3", {}).items():
        lines.append(f"3. recovery after SIGKILL ({case}, 5 s jobs): {p3['restarted']}/"
                     f"{p3['jobs_held']} jobs restarted, p50 {p3['p50_s']:.1f} s, "
                     f"max {p3['max_s']:.1f} s (lease {p3['lease_timeout_s']:.0f} s)")
    if "part5" in res:
        lines.append("5. scale-out (no-op path)  replicas  jobs/s  cores used: workers / postgres "
                     "/ redis / producer")
        for row in res["part5"]["rows"]:
            c = row["cores_used"]
            lines.append(f"   {'':<24}{row['replicas']:>9}{row['jobs_per_s']:>8.0f}  "
                         f"{c['worker']:.2f} / {c['postgres']:.2f} / {c['redis']:.2f} / "
                         f"{c['producer']:.2f}")
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [k for k in ("part1", "part2", "part5") if k in res]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 4), squeeze=False)
    for ax, key in zip(axes[0], parts, strict=True):
        if key == "part1":
            rows = res[key]["rows"]
            ax.bar([r["system"] for r in rows], [r["jobs_per_s"] for r in rows],
                   color=["tab:green"] + ["tab:gray"] * (len(rows) - 1))
            ax.set_title(f"no-op jobs/s (concurrency {res[key]['concurrency']})")
        elif key == "part2":
            rows = res[key]["rows"]
            xs = [str(r["concurrency"]) for r in rows]
            ax.plot(xs, [r["worker_scans_per_s"] for r in rows], "o-", label="safeurl worker")
            ax.plot(xs, [r["docker_run_scans_per_s"] for r in rows], "s--",
                    label="docker run --rm loops")
            ax.set_title("container scans/s by concurrency")
            ax.legend()
        else:
            rows = res[key]["rows"]
            ax.plot([r["replicas"] for r in rows], [r["jobs_per_s"] for r in rows], "o-")
            ax.set_title("scale-out: no-op jobs/s by replicas")
            ax.set_xticks([r["replicas"] for r in rows])
    fig.suptitle(f"SafeURL Worker benchmark ({res['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000, help="part 1 and 5 job count")
    ap.add_argument("--concurrency", type=int, default=50, help="part 1 and 5 concurrency")
    ap.add_argument("--scans", type=int, default=200, help="part 2 scans per level")
    ap.add_argument("--container-concurrency", default="1,4,8")
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--parts", default="1,2,3,5")
    ap.add_argument("--systems", default="saq,arq,celery")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    ap.add_argument("--merge", action="store_true",
                    help="update the parts run now in an existing results.json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    res: dict[str, Any] = {"machine": f"{os.cpu_count()} cores",
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.merge and (args.out / "results.json").exists():
        res = {**json.loads((args.out / "results.json").read_text()), **res}
    if "1" in parts:
        res["part1"] = part1(args.jobs, args.concurrency, args.redis_url,
                             [s for s in args.systems.split(",") if s])
    if "2" in parts:
        res["part2"] = part2(args.scans, [int(c) for c in args.container_concurrency.split(",")],
                             args.redis_url)
    if "3" in parts:
        # With headroom (6 jobs, 2 x 4 slots: the survivor has free slots) and saturated (40 jobs:
        # a reclaimed job waits for a free slot, at most one job's length).
        res["part3"] = {"headroom": uvloop.run(recovery(6, args.redis_url, job_seconds=5.0)),
                        "saturated": uvloop.run(recovery(40, args.redis_url, job_seconds=5.0))}
    if "5" in parts:
        res["part5"] = part5(args.jobs, args.concurrency, args.redis_url,
                             [int(n) for n in args.replicas.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    chart(res, args.out / "results.png")
    print(table(res))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
