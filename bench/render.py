"""Part 7: render scans/s next to static scans/s, through the real worker and Docker.

The page is the render test host's script-built login (tests/testhost/render/server.py), served
on an internal docker network of its own. A static scan runs the fetcher; a render scan runs the
fetcher and then the browser image (docs/fetcher.md, *Render scans in the worker*), with the
sandbox's default limits (CONTAINER_CPU_LIMIT 0.5 per container). Each round starts a worker
with SCAN_MODE=static or SCAN_MODE=render, enqueues the scans at once and times the last one.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .harness import percentile, spawn
from .ours import enqueue, running, wait_completed

ROOT = Path(__file__).resolve().parent.parent
PAGE = "http://site-a.test/script-login"


class RenderHost:
    """The render test host alone on an internal network (site-a.test, site-b.test)."""

    def __init__(self, sh: Any, image: str) -> None:
        self.sh = sh
        self.network = f"safeurl-bench-render-{uuid.uuid4().hex[:6]}"
        self.container = f"{self.network}-host"
        sh("docker", "network", "create", "--internal", self.network)
        sh("docker", "run", "-d", "--name", self.container, "--network", self.network,
           "--network-alias", "site-a.test", "--network-alias", "site-b.test", "--user", "0",
           "--entrypoint", "python3", "-v",
           f"{ROOT / 'tests' / 'testhost' / 'render'}:/srv:ro", image, "/srv/server.py", "80")
        sh("docker", "exec", self.container, "python3", "-c",
           "import time,socket\nfor _ in range(100):\n  try:\n"
           "    socket.create_connection(('127.0.0.1',80),1).close();break\n"
           "  except OSError: time.sleep(0.1)")
        self.ip = sh("docker", "inspect", self.container, "-f",
                     "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")

    def stop(self) -> None:
        self.sh("docker", "rm", "-f", self.container, check=False)
        self.sh("docker", "network", "rm", self.network, check=False)


async def scan_rate(host: RenderHost, mode: str, scans: int, concurrency: int,
                    redis_url: str) -> dict[str, float]:
    """`scans` jobs of one mode, all queued at once, on one worker at `concurrency`."""
    async with running(redis_url, lambda env: [spawn(
            [str(Path(sys.executable).parent / "safeurl-worker"), "run"],
            env.worker_env(f"bench-{mode}", concurrency, SCAN_MODE=mode,
                           FETCHER_NETWORK=host.network, FETCH_ALLOW_CIDRS=f"{host.ip}/32",
                           FETCH_ALLOWED_PORTS="80"),
            Path(f"/tmp/{env.stream}.log"))]) as (env, r, pool, _):
        t0 = time.time()
        await enqueue(pool, r, env.stream, scans, url=PAGE)
        t1 = await wait_completed(pool, scans, 600)
        secs = [float(x["s"]) for x in await pool.fetch(
            "SELECT extract(epoch FROM finished_at - created_at) AS s FROM scan_jobs")]
        rendered = await pool.fetchval(
            "SELECT count(*) FROM scan_results WHERE jsonb_typeof(report->'render') = 'object'")
        if rendered != (scans if mode == "render" else 0):
            raise RuntimeError(f"{mode}: {rendered} of {scans} results were rendered")
        return {"scans_per_s": scans / (t1 - t0), "p50_s": percentile(secs, 0.5)}
