"""compose.yaml, run for real on this machine (docs/deploy.md, section 1).

Every image is built locally: the service images (Redis, PostgreSQL, Prometheus from Debian's
packages) and the local base by `scripts/build-images.sh services`, the worker and the fetcher by
`compose build` from the Containerfile. Then `up --scale worker=3`; scans submitted through the
stack (`safeurl-worker submit` in a worker container) complete on all three replicas; Prometheus
scrapes all three; a replica killed while it holds scans sees them finished by the others.
`down -v` always runs at the end.

Isolation: a project of its own, images tagged `:compose-test` (the suite's `:latest` images are
left alone), nothing published but Prometheus on a free 127.0.0.1 port (so the suite's Redis and
PostgreSQL on 127.0.0.1 are untouched), and a fetch network the test creates: internal, with its
own bridge, the test host on it, and FETCH_ALLOW_CIDRS its subnet - the fetchers can reach the test
host and nothing else.

70-95 s with the images built (about 26 s of it the fixture: cached builds, `up`, three healthy
workers); the first run on a machine also builds the service images and the worker (~2 min).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import HOST_ALIASES, ROOT, docker
from .test_deploy import compose_cli

pytestmark = pytest.mark.integration

TAG = "compose-test"
FETCHER_IMAGE = f"safeurl-fetcher:{TAG}"
WORKER_IMAGE = f"safeurl-worker:{TAG}"
REPLICAS = 3
TERMINAL = {"COMPLETED", "FAILED", "TIMED_OUT"}
LABEL_WORKER = "safeurl.worker_id"  # runner.LABEL_WORKER, on every fetcher container


@dataclass
class Stack:
    cli: list[str]
    project: str
    env_file: Path  # what scripts/build-images.sh built (image names, base, wheel source)
    env: dict[str, str]
    network: str
    host: str  # the test host's container
    prometheus_port: int

    def compose(self, *args: str, timeout: float = 300, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*self.cli, "-p", self.project, "--env-file", str(self.env_file),
                              *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: {out.stdout[-3000:]}"
                                 f"{out.stderr[-3000:]}")
        return out

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, timeout=60).stdout.split()

    def workers(self) -> dict[str, str]:
        """Running worker replicas: hostname (the first part of WORKER_ID) -> container id."""
        out = {}
        for cid in self.containers("worker"):
            host, running = docker("inspect", "-f", "{{.Config.Hostname}} {{.State.Running}}",
                                   cid).split()
            if running == "true":
                out[host] = cid
        return out

    def sql(self, query: str) -> list[list[str]]:
        (pg,) = self.containers("postgres")
        text = docker("exec", pg, "psql", "-U", "safeurl", "-d", "safeurl", "-X", "-q", "-tA",
                      "-F", "\t", "-c", query, timeout=60)
        return [line.split("\t") for line in text.splitlines() if line]

    def submit(self, urls: list[str]) -> list[str]:
        """`safeurl-worker submit`, the CLI's path into the stream, in one worker container."""
        worker = next(iter(self.workers().values()))
        out = docker("exec", "-u", "10001", worker, "sh", "-c",
                     'for u in "$@"; do safeurl-worker submit "$u" || exit 1; done', "sh", *urls,
                     timeout=30 + 10 * len(urls))
        ids = out.split()
        assert len(ids) == len(urls), out
        return ids

    def jobs(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        """id -> (state, worker_id)."""
        quoted = ",".join(f"'{uuid.UUID(i)}'" for i in ids)
        rows = self.sql(f"SELECT id, state, coalesce(worker_id, '-') FROM scan_jobs "
                        f"WHERE id IN ({quoted})")
        return {r[0]: (r[1], r[2]) for r in rows}

    def logs(self) -> str:
        out = self.compose("logs", "--no-color", "--tail", "30", timeout=60, check=False)
        return out.stdout[-6000:]


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0,
             stack: Stack | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = f"\n--- compose logs ---\n{stack.logs()}" if stack else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{logs}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs}


def worker_of(worker_id: str, workers: dict[str, str]) -> str | None:
    """The replica (hostname) a WORKER_ID (<hostname>-<pid>) belongs to."""
    return next((h for h in workers if worker_id.startswith(h + "-")), None)


def _remove_fetchers(hostnames: set[str]) -> None:
    """Fetcher containers the replicas started (a killed replica cannot remove its own)."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL_WORKER}", check=False).split()
    for cid in ids:
        owner = docker("inspect", "-f", f'{{{{index .Config.Labels "{LABEL_WORKER}"}}}}', cid,
                       check=False)
        if any(owner.startswith(h + "-") for h in hostnames):
            docker("rm", "-f", cid, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose implementation (Debian: apt-get install docker-compose)")
    tmp = tmp_path_factory.mktemp("compose")
    env_file = tmp / "compose.env"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    # 1. The local base if needed, the fetcher, and Redis/PostgreSQL/Prometheus images.
    build = subprocess.run(
        ["bash", "scripts/build-images.sh", "services"], cwd=ROOT, capture_output=True,
        text=True, timeout=1500,
        env={**base_env, "FETCHER_IMAGE": FETCHER_IMAGE, "WORKER_IMAGE": WORKER_IMAGE,
             "SAFEURL_COMPOSE_ENV": str(env_file)})
    assert build.returncode == 0, build.stderr[-4000:]
    built = read_env_file(env_file)
    assert {"BASE_IMAGE", "REDIS_IMAGE", "POSTGRES_IMAGE", "PROMETHEUS_IMAGE"} <= set(built)

    suffix = uuid.uuid4().hex[:8]
    network = f"safeurl-ct-{suffix}"
    bridge = f"br-ct-{suffix}"  # interface names: 15 characters at most
    project = f"safeurlct{suffix}"
    # 2. The fetch network: internal (no route out), containers may talk (the test host is on
    # it). Made here, before `up`, so its subnet can go into FETCH_ALLOW_CIDRS; Compose finds it
    # with the options compose.yaml gives it and uses it.
    docker("network", "create", "--driver", "bridge", "--internal",
           "-o", f"com.docker.network.bridge.name={bridge}",
           "-o", "com.docker.network.bridge.enable_icc=true",
           "--label", "safeurl.test=1", network)
    host = f"{network}-host"
    password = uuid.uuid4().hex
    env = {**base_env, **built,
           "FETCHER_IMAGE": FETCHER_IMAGE, "WORKER_IMAGE": WORKER_IMAGE,
           "FETCHER_NETWORK": network, "FETCHER_BRIDGE": bridge,
           "FETCHER_NETWORK_INTERNAL": "true", "FETCHER_ICC": "true",
           "REDIS_PASSWORD": password, "POSTGRES_PASSWORD": password,
           "PROMETHEUS_PORT": str(free_port()), "WORKER_CONCURRENCY": "3",
           "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
    st = Stack(cli, project, env_file, env, network, host, int(env["PROMETHEUS_PORT"]))
    hostnames: set[str] = set()
    try:
        subnet = docker("network", "inspect", network, "-f", "{{(index .IPAM.Config 0).Subnet}}")
        env["FETCH_ALLOW_CIDRS"] = subnet
        aliases = [a for alias in HOST_ALIASES for a in ("--network-alias", alias)]
        docker("run", "-d", "--name", host, "--network", network, *aliases,
               "--label", "safeurl.test=1", "--user", "0", "--entrypoint", "python3",
               "-v", f"{ROOT / 'tests' / 'testhost'}:/srv:ro", FETCHER_IMAGE,
               "/srv/server.py", "80")
        # 3. The worker and fetcher images, by Compose from the Containerfile.
        st.compose("build", timeout=1500)
        # 4. Up, three workers. `up` itself waits for redis/postgres healthy and migrate done.
        st.compose("up", "-d", "--no-build", "--scale", f"worker={REPLICAS}", timeout=600)

        def healthy() -> bool:
            ids = st.containers("worker")
            states = [docker("inspect", "-f", "{{.State.Health.Status}}", c) for c in ids]
            return len(ids) == REPLICAS and all(s == "healthy" for s in states)

        wait_for("three healthy workers", healthy, timeout=180, every=2, stack=st)
        hostnames = set(st.workers())
        yield st
    finally:
        with contextlib.suppress(Exception):
            hostnames |= set(st.workers())
        # Workers first (each drains and removes its own warm fetchers), then what a killed
        # replica left, then the test host: the network must have no container left on it.
        st.compose("stop", "-t", "30", timeout=180, check=False)
        _remove_fetchers(hostnames)
        docker("rm", "-f", host, check=False)
        down = st.compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)
        docker("network", "rm", network, check=False)
        if down.returncode != 0:  # e.g. the network was still in use: once more, without it
            st.compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)


# --------------------------------------------------------------------------- tests

@pytest.mark.timeout(2400)  # the first test also pays for the builds and `up`
def test_scans_complete_on_all_three_replicas(stack: Stack) -> None:
    workers = stack.workers()
    assert len(workers) == REPLICAS
    done_by: dict[str, set[str]] = {}
    submitted: list[str] = []
    # Rounds of scans until every replica has completed some (the stream hands entries to the
    # consumers blocked on it in turn, so the first round nearly always suffices).
    for rnd in range(5):
        urls = [f"http://{HOST_ALIASES[i % 3]}/slow?round={rnd}&n={i}" for i in range(6)]
        ids = stack.submit(urls)
        submitted += ids

        def finished(ids: list[str] = ids) -> dict[str, tuple[str, str]] | None:
            jobs = stack.jobs(ids)
            return jobs if len(jobs) == len(ids) and all(
                s in TERMINAL for s, _ in jobs.values()) else None

        jobs = wait_for("the scans to finish", finished, timeout=120, every=1, stack=stack)
        for job_id, (state, worker_id) in jobs.items():
            assert state == "COMPLETED", (job_id, state, stack.sql(
                f"SELECT error_code, error_message FROM scan_jobs WHERE id = '{job_id}'"))
            replica = worker_of(worker_id, workers)
            assert replica is not None, f"{worker_id} is none of {sorted(workers)}"
            done_by.setdefault(replica, set()).add(job_id)
        if len(done_by) == REPLICAS:
            break
    assert set(done_by) == set(workers), {k: len(v) for k, v in done_by.items()}
    # Real scans: each has a result, from the page the test host served.
    quoted = ",".join(f"'{i}'" for i in submitted)
    rows = stack.sql(f"SELECT count(*) FROM scan_results WHERE job_id IN ({quoted}) "
                     "AND http_status = 200 AND verdict IS NOT NULL")
    assert int(rows[0][0]) == len(submitted)


@pytest.mark.timeout(120)
def test_workers_run_unprivileged_with_the_sockets_group(stack: Stack) -> None:
    """Started as root (compose.yaml), the worker process itself is uid 10001 with no
    capability, and has the host socket's group - found by the entrypoint, no DOCKER_GID set."""
    socket_gid = os.stat("/var/run/docker.sock").st_gid
    # bracket: the pattern must not match this shell's own command line
    probe = ('for p in /proc/[0-9]*; do grep -q "bin/safeurl-worke[r]" $p/cmdline '
             '2>/dev/null && grep -E "^(Uid|Gid|Groups|CapEff|CapPrm):" $p/status; done; true')
    for cid in stack.workers().values():
        out = docker("exec", cid, "sh", "-c", probe)
        status = dict(line.split(":", 1) for line in out.splitlines())
        assert status, f"no worker process found in {cid}"
        assert set(status["Uid"].split()) == {"10001"} and set(status["Gid"].split()) == {"10001"}
        assert str(socket_gid) in status["Groups"].split()
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    for image, user in ((WORKER_IMAGE, "10001:10001"), (FETCHER_IMAGE, "65534:65534")):
        info = json.loads(docker("image", "inspect", image))[0]["Config"]
        assert info["User"] == user
        labels = info["Labels"]
        assert labels["org.opencontainers.image.title"] == image.split(":")[0]
        assert labels["org.opencontainers.image.version"] not in ("", "dev")
        assert labels["org.opencontainers.image.base.name"]
    worker = json.loads(docker("image", "inspect", WORKER_IMAGE))[0]["Config"]
    assert worker["Entrypoint"][0] == "tini"


@pytest.mark.timeout(300)
def test_prometheus_scrapes_all_three_replicas(stack: Stack) -> None:
    metrics_net = f"{stack.project}_metrics"
    ips = set()
    for cid in stack.workers().values():
        nets = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", cid))
        ips.add(nets[metrics_net]["IPAddress"])
    url = f"http://127.0.0.1:{stack.prometheus_port}/api/v1/targets?state=active"

    def scraped() -> set[str] | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                data = json.load(resp)["data"]["activeTargets"]
        except OSError:
            return None
        up = {t["labels"]["instance"].rsplit(":", 1)[0] for t in data
              if t["labels"]["job"] == "safeurl-worker" and t["health"] == "up"}
        return up if up == ips else None

    # DNS discovery refreshes every 15 s, scrapes run every 15 s.
    assert wait_for("Prometheus to scrape every replica", scraped, timeout=120, every=3,
                    stack=stack) == ips


@pytest.mark.timeout(600)
def test_a_killed_replicas_scans_finish_on_another(stack: Stack) -> None:
    workers = stack.workers()
    assert len(workers) == REPLICAS
    # The test host is frozen, so the scans hang mid-fetch: whichever replica holds one when it
    # is killed holds it for certain.
    docker("pause", stack.host)
    try:
        ids = stack.submit([f"http://{HOST_ALIASES[i % 3]}/?kill={i}" for i in range(6)])

        def held() -> dict[str, list[str]] | None:
            by: dict[str, list[str]] = {}
            for job_id, (state, worker_id) in stack.jobs(ids).items():
                replica = worker_of(worker_id, workers)
                if state == "FETCHING" and replica:
                    by.setdefault(replica, []).append(job_id)
            return by or None

        victim, victim_jobs = next(iter(wait_for("a replica to hold a scan", held, timeout=60,
                                                  every=0.5, stack=stack).items()))
        # SIGKILL: no drain. Docker counts it as a manual stop, so `restart: unless-stopped`
        # does not bring the replica back under the same consumer name.
        docker("kill", workers[victim])
        victim_id = {wid for _, wid in stack.jobs(victim_jobs).values()}
    finally:
        docker("unpause", stack.host, check=False)

    def finished() -> dict[str, tuple[str, str]] | None:
        jobs = stack.jobs(ids)
        return jobs if all(s in TERMINAL for s, _ in jobs.values()) else None

    # The others take the dead consumer's entries over once its leases lapse (LEASE_TIMEOUT_MS).
    jobs = wait_for("the killed replica's scans to finish elsewhere", finished, timeout=240,
                    every=2, stack=stack)
    assert docker("inspect", "-f", "{{.State.Running}}", workers[victim]) == "false"
    survivors = {h for h in workers if h != victim}
    for job_id in victim_jobs:
        state, worker_id = jobs[job_id]
        assert state == "COMPLETED", (job_id, state)
        assert worker_of(worker_id, workers) in survivors, (job_id, worker_id, victim)
        audit = stack.sql(f"SELECT to_state, coalesce(worker_id, '-') FROM scan_audit_log "
                          f"WHERE job_id = '{job_id}' ORDER BY version, id")
        # The killed replica had claimed it; a survivor completed it.
        assert [s for s, w in audit if w in victim_id] and audit[-1][0] == "COMPLETED", audit
    assert all(s == "COMPLETED" for s, _ in jobs.values()), jobs
