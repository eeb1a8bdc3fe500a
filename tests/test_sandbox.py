"""The fetcher sandbox, proven on real containers (docs/sandbox.md).

Every container here is created from `runner.container_config` - the exact configuration the
worker uses - through aiodocker, like `Runner.run`. Some tests swap only the entrypoint (a memory
hog, a fork loop, a port probe) in a copy of that configuration, so the limits under test are
the worker's own. The only addresses any container is pointed at are the test host on the
test's internal network and this machine's own address on a docker bridge; every container is
removed in a `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import ipaddress
import json
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiodocker
import pytest

from safeurl_worker.config import Settings
from safeurl_worker.runner import LABEL_JOB, LABEL_WORKER, Runner, container_config

from .conftest import FETCHER_IMAGE, ROOT, TestNet, docker

pytestmark = pytest.mark.integration

# What a container carries with FETCHER_SECCOMP_PROFILE unset: the package's profile, as text.
SHIPPED_SECCOMP = ROOT / "safeurl_worker" / "data" / "seccomp-default.json"
SHIPPED_SECCOMP_OPT = "seccomp=" + json.dumps(json.loads(SHIPPED_SECCOMP.read_bytes()),
                                              separators=(",", ":"))
REDIS_SECRET = f"redis-pw-{uuid.uuid4().hex}"
DB_SECRET = f"db-pw-{uuid.uuid4().hex}"


def sandbox_settings(testnet: TestNet, **overrides: Any) -> Settings:
    """Worker settings carrying real-looking secrets, to prove none reaches a container."""
    base: dict[str, Any] = {
        "redis_password": REDIS_SECRET,
        "database_url": f"postgresql://safeurl:{DB_SECRET}@127.0.0.1:5432/safeurl",
        "fetcher_image": FETCHER_IMAGE, "fetcher_network": testnet.name,
        "fetch_allow_cidrs": testnet.subnet, "fetch_allowed_ports": "80",
        "worker_id": f"w-sandbox-{uuid.uuid4().hex[:6]}",
        "container_memory_limit_mb": 256, "container_cpu_limit": 0.5,
        "container_pids_limit": 64, "container_timeout_ms": 60000, "fetch_timeout_ms": 60000,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
async def dockerc() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url="unix:///var/run/docker.sock")
    yield client
    await client.close()


async def _create(client: aiodocker.Docker, config: dict[str, Any]) -> Any:
    name = f"safeurl-sandboxtest-{uuid.uuid4().hex[:10]}"
    return await client.containers.create(config=config, name=name)


async def _remove(container: Any) -> None:
    try:
        await container.delete(force=True)
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise


def _inspect(container_id: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker("inspect", container_id))
    return data[0]


async def _exec(container_id: str, code: str) -> tuple[int, str, str]:
    """`docker exec` (as the container's own user) running a Python snippet."""
    proc = await asyncio.create_subprocess_exec(
        "docker", "exec", container_id, "python3", "-c", code,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _run_to_exit(client: aiodocker.Docker, config: dict[str, Any],
                       timeout: float = 60) -> tuple[int, str, dict[str, Any]]:
    """Create, start, wait; return (exit code, stdout, docker inspect). Always removed."""
    container = await _create(client, config)
    try:
        await container.start()
        status = await asyncio.wait_for(container.wait(), timeout)
        logs = await container.log(stdout=True, stderr=False)
        return int(status["StatusCode"]), "".join(logs), _inspect(container.id)
    finally:
        await _remove(container)


def _with_entrypoint(config: dict[str, Any], code: str, *args: str) -> dict[str, Any]:
    """The worker's configuration with only the program replaced."""
    cfg = copy.deepcopy(config)
    cfg["Entrypoint"] = ["python3", "-c", code]
    cfg["Cmd"] = list(args)
    return cfg


# --- the configuration of a running fetcher -------------------------------------------------

PROBE_PROCESS = r"""
import json, os
me = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid()}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
me["self"] = {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs")}
# The fetcher process itself (python3 -m fetcher URL), not just this exec'd shell.
fetchers = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines()
                  if ":" in l)
    except OSError:
        continue
    if b"fetcher" in cmd:
        fetchers[pid] = {"argv0": cmd[0].decode(), "Uid": st["Uid"].split(),
                         "CapEff": st["CapEff"].strip(), "NoNewPrivs": st["NoNewPrivs"].strip(),
                         "environ": env}
me["fetchers"] = fetchers
def attempt(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        return 0
    except OSError as exc:
        return exc.errno
me["write"] = {p: attempt(p) for p in ("/app/planted.py", "/app/fetcher/planted.py",
                                        "/planted", "/var/tmp/planted", "/tmp/ok")}
# /tmp is writable but noexec: a dropped program cannot run.
with open("/tmp/run.sh", "w") as fh:
    fh.write("#!/bin/sh\necho ran\n")
os.chmod("/tmp/run.sh", 0o755)
child = os.fork()
if child == 0:
    try:
        os.execv("/tmp/run.sh", ["/tmp/run.sh"])
    finally:
        os._exit(126)  # exec failed; the parent reads the errno below
me["exec_tmp"] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
try:
    os.execv("/tmp/run.sh", ["/tmp/run.sh"])  # only returns by raising
except OSError as exc:
    me["exec_tmp_errno"] = exc.errno
me["docker_sock"] = [p for p in ("/var/run/docker.sock", "/run/docker.sock")
                     if os.path.exists(p)]
mounts = {}
for line in open("/proc/self/mountinfo"):
    f = line.split()
    mounts[f[4]] = f[5] + "," + line.split(" - ", 1)[1].split()[2]
me["mounts"] = mounts
print(json.dumps(me))
"""


@contextlib.asynccontextmanager
async def _running_fetcher(form: str, settings: Settings, job_id: uuid.UUID, url: str,
                           client: aiodocker.Docker) -> AsyncIterator[Any]:
    """A running fetcher for `url`: created from the `docker run IMAGE URL` form, or a warm
    container the runner started for the job (the URL on stdin). Removed afterwards."""
    if form == "docker-run":
        container = await _create(client, container_config(settings, job_id, url))
        try:
            await container.start()
            yield container
        finally:
            await _remove(container)
        return
    runner = Runner(settings, client)
    pool = asyncio.create_task(runner.keep_warm())
    for _ in range(300):
        if runner._warm:
            break
        await asyncio.sleep(0.1)
    run = asyncio.create_task(runner.run(job_id, url))
    try:
        for _ in range(300):
            if cid := docker("ps", "-q", "--filter", f"name=safeurl-{job_id}-",
                             "--filter", "status=running"):
                break
            await asyncio.sleep(0.1)
        yield client.containers.container(cid)
    finally:
        for task in (run, pool):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.settle()


@pytest.mark.parametrize("form", ["docker-run", "warm"])
async def test_running_fetcher_container_is_locked_down(
        testnet: TestNet, dockerc: aiodocker.Docker, form: str) -> None:
    settings = sandbox_settings(testnet)
    job_id = uuid.uuid4()
    # /hang accepts and never answers; the fetch deadline (60 s) keeps the fetcher waiting.
    async with _running_fetcher(form, settings, job_id, "http://site-a.test/hang",
                                dockerc) as container:
        info = _inspect(container.id)
        assert info["State"]["Running"] is True, info["State"]
        cfg, hc = info["Config"], info["HostConfig"]
        mem = 256 * 1024 * 1024

        assert cfg["User"] == "65534:65534"
        assert hc["ReadonlyRootfs"] is True
        assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd")
        assert hc["SecurityOpt"] == ["no-new-privileges", SHIPPED_SECCOMP_OPT]
        assert hc["Privileged"] is False
        assert hc["PidsLimit"] == settings.container_pids_limit == 64
        assert hc["Memory"] == hc["MemorySwap"] == mem
        assert hc["NanoCpus"] == 500_000_000
        assert not hc.get("Binds") and not hc.get("Mounts") and not info.get("Mounts")
        assert not hc.get("VolumesFrom") and not hc.get("Devices")
        assert hc["NetworkMode"] == settings.fetcher_network == testnet.name
        assert list(info["NetworkSettings"]["Networks"]) == [testnet.name]
        assert hc["Tmpfs"] == {"/tmp": "rw,noexec,nosuid,nodev,size=16m"}
        assert hc["Init"] is True and hc["IpcMode"] == "private"
        assert hc["LogConfig"] == {"Type": "json-file",
                                   "Config": {"max-size": "4m", "max-file": "1"}}
        assert cfg["Labels"][LABEL_WORKER] == settings.worker_id
        if form == "docker-run":
            assert cfg["Labels"][LABEL_JOB] == str(job_id)
            assert cfg["Cmd"] == ["http://site-a.test/hang"]
        else:  # made before its job: no job label, no URL in argv; named for the job
            assert cfg["Labels"][LABEL_JOB] == "" and not cfg["Cmd"]
            assert info["Name"].startswith(f"/safeurl-{job_id}-")
            assert cfg["OpenStdin"] and cfg["StdinOnce"] and not cfg["Tty"]

        # Env: the image's own defaults plus the FETCH_* limits, nothing else, no secret.
        image_env = set(json.loads(docker("image", "inspect", FETCHER_IMAGE,
                                          "-f", "{{json .Config.Env}}")))
        assert all(re.match(r"(PATH|LANG|LC_\w+|PYTHON\w+|GPG_KEY|HOME)=", e)
                   for e in image_env), image_env
        added = {e for e in cfg["Env"] if e not in image_env}
        assert added == {f"{k}={v}" for k, v in settings.fetcher_env().items()}
        assert all(e.startswith("FETCH_") for e in added)
        whole = json.dumps(info)
        for secret in (REDIS_SECRET, DB_SECRET, settings.database_url):
            assert secret not in whole

        # Inside, as the container's user.
        rc, out, err = await _exec(container.id, PROBE_PROCESS)
        assert rc == 0, err
        me = json.loads(out)
        assert (me["uid"], me["gid"], me["euid"]) == (65534, 65534, 65534)
        assert int(me["self"]["CapEff"], 16) == 0 and int(me["self"]["CapPrm"], 16) == 0
        assert int(me["self"]["CapBnd"], 16) == 0 and me["self"]["NoNewPrivs"] == "1"
        # The running fetcher (python3 -m fetcher) and docker-init (PID 1) that started it.
        procs = me["fetchers"]
        assert "1" in procs and any(p["argv0"].endswith("python3") for p in procs.values())
        for proc in procs.values():
            assert set(proc["Uid"]) == {"65534"}, proc
            assert int(proc["CapEff"], 16) == 0 and proc["NoNewPrivs"] == "1", proc
            for secret in (REDIS_SECRET, DB_SECRET, "DATABASE_URL", "REDIS_"):
                assert secret not in proc["environ"], proc
        # The root filesystem is read-only: EROFS even where permissions would allow it.
        assert me["write"]["/var/tmp/planted"] == errno.EROFS, me["write"]
        for path in ("/app/planted.py", "/app/fetcher/planted.py", "/planted"):
            assert me["write"][path] in (errno.EROFS, errno.EACCES), me["write"]
        assert me["write"]["/tmp/ok"] == 0
        # noexec /tmp: a dropped program cannot run.
        assert me["exec_tmp"] == 126 and me["exec_tmp_errno"] == errno.EACCES, me
        assert me["mounts"]["/"].split(",")[0] == "ro", me["mounts"]["/"]
        tmp_opts = set(me["mounts"]["/tmp"].split(","))
        assert {"rw", "noexec", "nosuid", "nodev"} <= tmp_opts, tmp_opts
        assert me["docker_sock"] == []
        assert not any("docker.sock" in m for m in me["mounts"])
        # No search domains from the host: a bare name must not become an internal one.
        assert hc["DnsSearch"] == ["."]
        rc, out, err = await _exec(container.id, "print(open('/etc/resolv.conf').read())")
        assert rc == 0, err
        domains = [w for line in out.splitlines() if line.startswith("search")
                   for w in line.split()[1:] if w != "."]
        assert domains == [], out
    assert docker("ps", "-aq", "--filter", f"name=safeurl-{job_id}-") == ""
    assert docker("ps", "-aq", "--filter", f"label={LABEL_WORKER}={settings.worker_id}") == ""


# --- host isolation -------------------------------------------------------------------------

PORT_PROBE = r"""
import json, socket, sys
host, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
out = {}
for port in ports:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            out[port] = "open:" + s.recv(16).decode(errors="replace")
    except ConnectionRefusedError:
        out[port] = "refused"
    except TimeoutError:
        out[port] = "timeout"
    except OSError as exc:
        out[port] = f"error:{exc.errno}"
print(json.dumps(out))
"""


def _host_address_on(network: str) -> str:
    """This machine's own address on a docker network: its gateway, else docker0's."""
    gw = docker("network", "inspect", network, "-f",
                "{{range .IPAM.Config}}{{.Gateway}} {{end}}").split()
    ours = set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/",
                          subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                         text=True, check=True, timeout=10).stdout))
    candidates = [a for a in gw if a in ours]
    if not candidates:
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", subprocess.run(
            ["ip", "-4", "addr", "show", "docker0"], capture_output=True, text=True,
            check=True, timeout=10).stdout)
        assert m, "no gateway and no docker0 address"
        candidates = [m[1]]
    addr = candidates[0]
    assert addr in ours and not ipaddress.ip_address(addr).is_loopback
    return addr


async def test_by_default_a_fetcher_is_on_the_isolated_network_under_the_shipped_profile(
        dockerc: aiodocker.Docker) -> None:
    """Nothing set but the image: the container is on `safeurl-fetch` (made by
    scripts/services.sh: its own bridge, no traffic between containers) and carries the
    seccomp profile shipped in the package; FETCHER_SECCOMP_PROFILE=daemon leaves the daemon's
    built-in one. The URL is refused by the fetcher's address check: nothing leaves it."""
    net = json.loads(docker("network", "inspect", "safeurl-fetch"))[0]  # scripts/setup.sh
    assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    for profile, security in (("", ["no-new-privileges", SHIPPED_SECCOMP_OPT]),
                              ("daemon", ["no-new-privileges"])):
        settings = Settings(fetcher_image=FETCHER_IMAGE, fetcher_seccomp_profile=profile,
                            worker_id=f"w-sandbox-{uuid.uuid4().hex[:6]}")
        code, out, info = await _run_to_exit(
            dockerc, container_config(settings, uuid.uuid4(), "http://127.0.0.1/"), timeout=30)
        hc = info["HostConfig"]
        assert hc["NetworkMode"] == settings.fetcher_network == "safeurl-fetch"
        assert list(info["NetworkSettings"]["Networks"]) == ["safeurl-fetch"]
        assert hc["SecurityOpt"] == security, (profile, [o[:40] for o in hc["SecurityOpt"]])
        report = json.loads(out)
        assert code == 0 and report["error"]["code"] == "BLOCKED_TARGET", out[:500]


@pytest.mark.parametrize("network", ["testnet", "bridge"])
async def test_host_redis_and_postgres_unreachable_from_fetcher_network(
        network: str, testnet: TestNet, dockerc: aiodocker.Docker) -> None:
    net = testnet.name if network == "testnet" else "bridge"
    host_addr = _host_address_on(net)

    # Positive control: a listener on that same host address IS reachable, so "not open"
    # below means the services are not exposed, not that the probe cannot see the host.
    async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"pong")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(pong, host=host_addr, port=0)
    try:
        control = server.sockets[0].getsockname()[1]
        settings = sandbox_settings(testnet, fetcher_network=net)
        cfg = _with_entrypoint(container_config(settings, uuid.uuid4(), "http://unused.test/"),
                               PORT_PROBE, host_addr, "6379", "5432", str(control))
        code, out, _ = await _run_to_exit(dockerc, cfg, timeout=30)
    finally:
        server.close()
        await server.wait_closed()
    assert code == 0, out
    result = {int(k): v for k, v in json.loads(out).items()}
    assert result[control] == "open:pong", (net, host_addr, result)
    for port in (6379, 5432):  # Redis, PostgreSQL: bound to 127.0.0.1 only
        assert result[port] in ("refused", "timeout"), (net, host_addr, port, result)


# --- resource limits ------------------------------------------------------------------------


async def test_memory_limit_kills_a_memory_hog(
        testnet: TestNet, dockerc: aiodocker.Docker) -> None:
    settings = sandbox_settings(testnet, container_memory_limit_mb=64, fetcher_network="none")
    cfg = _with_entrypoint(container_config(settings, uuid.uuid4(), "http://unused.test/"),
                           "b = bytearray(300 * 1024 * 1024)\nprint('survived', len(b))")
    assert cfg["HostConfig"]["Memory"] == cfg["HostConfig"]["MemorySwap"] == 64 * 1024 * 1024
    code, out, info = await _run_to_exit(dockerc, cfg, timeout=60)
    assert code == 137, (code, out)
    assert info["State"]["OOMKilled"] is True, info["State"]
    assert "survived" not in out


FORK_LOOP = r"""
import os, time
kids, failure = [], None
while len(kids) < 500:
    try:
        pid = os.fork()
    except OSError as exc:
        failure = exc.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
print(len(kids), failure, flush=True)
for pid in kids:
    os.kill(pid, 9)
for pid in kids:
    os.waitpid(pid, 0)
"""


async def test_pids_limit_stops_a_fork_loop(
        testnet: TestNet, dockerc: aiodocker.Docker) -> None:
    settings = sandbox_settings(testnet, fetcher_network="none")
    limit = settings.container_pids_limit
    cfg = _with_entrypoint(container_config(settings, uuid.uuid4(), "http://unused.test/"),
                           FORK_LOOP)
    code, out, _ = await _run_to_exit(dockerc, cfg, timeout=60)
    assert code == 0, out
    forked, failure = out.split()
    # docker-init (PID 1) and the loop itself count too: fork fails with EAGAIN below the limit.
    assert failure == str(errno.EAGAIN), out
    assert 10 <= int(forked) < limit < 200, out
