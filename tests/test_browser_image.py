"""The browser sandbox (safeurl-browser), proven on real containers with real Chromium.

Every render here runs with the HostConfig `runner.container_config` builds for the fetcher -
the worker's own sandbox settings - with only the image, the memory limit and the pids limit
swapped for the browser's (BROWSER_IMAGE, BROWSER_MEMORY_LIMIT_MB, BROWSER_PIDS_LIMIT), and a
test label instead of the job labels (which other tests' orphan clean-up removes). Pages
come from two test hosts on an internal docker network this module creates: `site-a.test` /
`site-b.test` (allowed: FETCH_ALLOW_CIDRS is its address only) and `refused.test` (same subnet,
not allowed). Both log every connection they receive, so "never sent" is checked at the
receiving end. All renders run once, concurrently, in a module fixture; the tests read them.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import importlib.util
import io
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import mmh3
import pytest
from PIL import Image, ImageStat

from safeurl_worker.config import Settings
from safeurl_worker.models import Report
from safeurl_worker.runner import container_config

from .conftest import FETCHER_IMAGE, ROOT, docker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BROWSER_IMAGE = Settings().browser_image
HOST_DIR = ROOT / "tests" / "testhost" / "render"
RENDER_LIMIT_S = 60  # one container, start to exit (a render takes a few seconds)


def _image_present(image: str) -> bool:
    try:
        return subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _image_present(BROWSER_IMAGE):
    pytest.skip(f"{BROWSER_IMAGE} not built (scripts/build-images.sh browser)",
                allow_module_level=True)


def _host_module() -> Any:
    spec = importlib.util.spec_from_file_location("render_testhost", HOST_DIR / "server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class RenderNet:
    name: str
    allowed_ip: str  # site-a.test and site-b.test
    refused_ip: str  # refused.test: same subnet, not in FETCH_ALLOW_CIDRS
    allowed_host: str
    refused_host: str


def _ip(container: str) -> str:
    return docker("inspect", container, "-f",
                  "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


def _start_host(net: str, name: str, aliases: tuple[str, ...], *extra: str) -> None:
    alias_args = [a for alias in aliases for a in ("--network-alias", alias)]
    docker("run", "-d", "--name", name, "--network", net, *alias_args,
           "--label", "safeurl.test=1", "--user", "0", "--entrypoint", "python3",
           "-v", f"{HOST_DIR}:/srv:ro", *extra, FETCHER_IMAGE, "/srv/server.py", "80",
           *(["443", "/certs/cert.pem", "/certs/key.pem"] if extra else []))
    docker("exec", name, "python3", "-c",
           "import time, socket\n"
           "for _ in range(100):\n"
           "    try: socket.create_connection(('127.0.0.1', 80), 1).close(); break\n"
           "    except OSError: time.sleep(0.1)\n")


def _self_signed(directory: Path) -> None:
    """A certificate for site-a.test that no browser trusts."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
                    "-subj", "/CN=site-a.test", "-addext", "subjectAltName=DNS:site-a.test"],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def rendernet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RenderNet]:
    name = f"safeurl-render-{uuid.uuid4().hex[:8]}"
    certs = tmp_path_factory.mktemp("certs")
    _self_signed(certs)
    docker("network", "create", "--internal", "--label", "safeurl.test=1", name)
    allowed, refused = f"{name}-allowed", f"{name}-refused"
    try:
        _start_host(name, allowed, ("site-a.test", "site-b.test"), "-v", f"{certs}:/certs:ro")
        _start_host(name, refused, ("refused.test",))
        yield RenderNet(name, _ip(allowed), _ip(refused), allowed, refused)
    finally:
        docker("rm", "-f", allowed, refused, check=False)
        docker("network", "rm", name, check=False)


@dataclass
class Run:
    exit_code: int
    stdout: str
    seconds: float
    memory_peak: int | None  # bytes, from the container's cgroup, read while it ran
    inspect: dict[str, Any]
    gone: bool  # the container no longer exists afterwards

    @property
    def report(self) -> dict[str, Any]:
        lines = self.stdout.splitlines()
        assert len(lines) == 1, self.stdout[:2000]
        data: dict[str, Any] = json.loads(lines[0])
        return data


def browser_settings(net: RenderNet) -> Settings:
    return Settings(fetcher_network=net.name, fetch_allow_cidrs=f"{net.allowed_ip}/32",
                    fetch_allowed_ports="80,443", container_timeout_ms=30000,
                    worker_id=f"w-render-{uuid.uuid4().hex[:6]}")


def browser_config(settings: Settings, url: str, image: str = BROWSER_IMAGE) -> dict[str, Any]:
    """The worker's sandbox configuration, with the browser's image and limits."""
    config = copy.deepcopy(container_config(settings, uuid.uuid4(), url))
    config["Image"] = image
    # Not the worker's job labels: other tests' orphan clean-up removes containers carrying them.
    config["Labels"] = {"safeurl.test": "1"}
    if image == BROWSER_IMAGE:
        mem = settings.browser_memory_limit_mb * 1024 * 1024
        config["HostConfig"].update(Memory=mem, MemorySwap=mem,
                                    PidsLimit=settings.browser_pids_limit)
    return config


def _cgroup_peak(container_id: str) -> int | None:
    for path in (f"/sys/fs/cgroup/memory/docker/{container_id}/memory.max_usage_in_bytes",
                 f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.peak",
                 f"/sys/fs/cgroup/docker/{container_id}/memory.peak"):
        try:
            return int(Path(path).read_text())
        except (OSError, ValueError):
            continue
    return None


async def run_container(client: aiodocker.Docker, config: dict[str, Any],
                        probe: str | None = None) -> tuple[Run, str | None]:
    """Create, start, watch the memory peak, wait, read stdout; always removed."""
    container = await client.containers.create(
        config=config, name=f"safeurl-rendertest-{uuid.uuid4().hex[:10]}")
    peak: int | None = None
    probe_out: str | None = None
    started = time.monotonic()
    try:
        await container.start()
        waiter = asyncio.ensure_future(container.wait())
        if probe is not None:
            probe_out = await _exec(container.id, probe)
        while not waiter.done():
            peak = max(peak or 0, _cgroup_peak(container.id) or 0) or peak
            await asyncio.wait({waiter}, timeout=0.2)
            if time.monotonic() - started > RENDER_LIMIT_S:
                raise AssertionError("render container did not exit in time")
        status = waiter.result()
        seconds = time.monotonic() - started
        logs = await container.log(stdout=True, stderr=False)
        info: dict[str, Any] = await container.show()
    finally:
        try:
            await container.delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
    try:
        await client.containers.get(container.id)
        gone = False
    except aiodocker.DockerError as exc:
        gone = exc.status == 404
    return Run(int(status["StatusCode"]), "".join(logs), seconds, peak, info, gone), probe_out


async def _exec(container_id: str, code: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "docker", "exec", container_id, "python3", "-c", code,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


# Run inside the browser container while it renders: the Chromium processes themselves.
PROBE = r"""
import json, os, time
def procs():
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines()
                      if ":" in l)
        except OSError:
            continue
        if b"chromium" in cmd[0]:
            found[pid] = {"Uid": st["Uid"].split(), "CapEff": st["CapEff"].strip(),
                          "CapBnd": st["CapBnd"].strip(), "NoNewPrivs": st["NoNewPrivs"].strip(),
                          "Seccomp": st.get("Seccomp", "").strip()}
    return found
for _ in range(100):
    found = procs()
    if len(found) >= 2:
        break
    time.sleep(0.1)
def attempt(path):
    try:
        with open(path, "w") as fh:
            fh.write("x")
        return 0
    except OSError as exc:
        return exc.errno
writes = {p: attempt(p) for p in ("/app/sandbox/render/planted.py", "/usr/bin/planted", "/tmp/ok")}
print(json.dumps({"chromium": found, "writes": writes, "uid": os.getuid()}))
"""

PAGES = {"login": "http://site-a.test/script-login", "timed": "http://site-a.test/timed",
         "image": "http://site-a.test/refused-image", "ws": "http://site-a.test/refused-ws",
         "refused_top": "http://refused.test/", "chain": "http://site-a.test/hop",
         "download": "http://site-a.test/download", "tls": "https://site-a.test/script-login"}


@dataclass
class Renders:
    runs: dict[str, Run]
    static_login: Run  # the fetcher image on the script-built login page
    probe: dict[str, Any]
    refused_log: str  # everything refused.test received
    settings: Settings


@pytest.fixture(scope="module")
def renders(rendernet: RenderNet) -> Renders:
    settings = browser_settings(rendernet)

    async def all_runs() -> Renders:
        client = aiodocker.Docker(url="unix:///var/run/docker.sock")
        slots = asyncio.Semaphore(4)  # a worker's concurrency, on this 2-core machine

        async def one(config: dict[str, Any], probe: str | None = None
                      ) -> tuple[Run, str | None]:
            async with slots:
                return await run_container(client, config, probe)

        try:
            jobs = [one(browser_config(settings, url), PROBE if key == "timed" else None)
                    for key, url in PAGES.items()]
            jobs.append(one(browser_config(settings, PAGES["login"], FETCHER_IMAGE)))
            results = await asyncio.gather(*jobs)
        finally:
            await client.close()
        runs = {key: run for key, (run, _) in zip(PAGES, results, strict=False)}
        probe = json.loads(results[list(PAGES).index("timed")][1] or "{}")
        return Renders(runs, results[-1][0], probe,
                       docker("logs", rendernet.refused_host), settings)

    return asyncio.run(all_runs())


def _validated(report: dict[str, Any]) -> Report:
    """The top level is the fetcher's report, as strict as the worker reads it."""
    return Report.model_validate({k: v for k, v in report.items() if k != "render"})


# --- what a browser sees that a fetch does not ---------------------------------------------


def test_login_form_built_by_script_is_in_rendered_features(renders: Renders) -> None:
    run = renders.runs["login"]
    assert run.exit_code == 0
    report = _validated(run.report)
    assert report.error is None, report.error
    assert report.http_status == 200 and report.title == "Account"
    forms = report.features.forms
    assert len(forms) == 1 and forms[0].has_password and forms[0].has_email
    assert forms[0].action == "http://site-b.test/collect"
    # The same page fetched statically has no form: it only exists after the script ran.
    static = Report.model_validate_json(renders.static_login.stdout)
    assert static.error is None and static.features.forms == []
    render = run.report["render"]
    assert {"type": "log", "text": "form built"}.items() <= render["console"][0].items()
    assert any(c["name"] == "session" and c["value"] == "abc123" for c in render["cookies"])
    assert render["dom"] is not None and "type=\"password\"" in render["dom"]
    assert render["requests"][0]["remote_address"] == report.connected_address
    assert report.connected_address == renders.settings.fetch_allow_cidrs.split("/")[0]
    # Nothing but the page's own requests: no call home by the browser (it would be refused
    # here - no DNS answer on an internal network - and recorded).
    assert render["refused"] == []


def test_favicon_hash_is_shodans_murmur3_of_the_base64(renders: Renders) -> None:
    icon = _host_module().ICON
    favicon = renders.runs["login"].report["render"]["favicon"]
    assert favicon["url"] == "http://site-a.test/icon.png" and favicon["status"] == 200
    assert favicon["mmh3"] == mmh3.hash(base64.encodebytes(icon))
    # The icon was loaded through the proxy like everything else.
    targets = [t["target"] for t in renders.runs["login"].report["render"]["proxy"]["targets"]]
    assert "http://site-a.test/icon.png" in targets


def test_timed_script_redirect_is_followed_and_recorded(renders: Renders) -> None:
    report = renders.runs["timed"].report
    assert _validated(report).error is None
    render = report["render"]
    assert report["final_url"] == "http://site-b.test/landing", (
        render["phases"], render["requests"], render["refused"])
    assert report["title"] == "Landing"
    hops = report["render"]["navigation"]
    assert [(h["url"], h["location"], h["kind"]) for h in hops] == [
        ("http://site-a.test/timed", "http://site-b.test/landing", "script")]
    # The top-level chain keeps the fetcher's kinds (http, meta) only.
    assert report["redirects"] == []


def test_header_and_meta_redirects_are_recorded_with_their_kinds(renders: Renders) -> None:
    report = renders.runs["chain"].report
    assert _validated(report).error is None
    assert report["final_url"] == "http://site-b.test/landing"
    hops = [(h["url"], h["location"], h["status"], h["kind"])
            for h in report["render"]["navigation"]]
    assert hops == [("http://site-a.test/hop", "http://site-a.test/meta-hop", 302, "http"),
                    ("http://site-a.test/meta-hop", "http://site-b.test/landing", None, "meta")]
    assert [(h["url"], h["kind"]) for h in report["redirects"]] == [
        ("http://site-a.test/hop", "http"), ("http://site-a.test/meta-hop", "meta")]


def test_download_is_recorded_with_its_hash(renders: Renders) -> None:
    data = _host_module().DOWNLOAD
    downloads = renders.runs["download"].report["render"]["downloads"]
    assert downloads == [{"url": "http://site-a.test/file.bin", "filename": "setup.exe",
                          "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                          "error": None}]


def test_untrusted_certificate_is_a_tls_error(renders: Renders) -> None:
    report = renders.runs["tls"].report
    error = _validated(report).error
    assert error is not None and error.code == "TLS_ERROR" and "ERR_CERT" in error.message
    # The tunnel went through the proxy, to the allowed address; the browser refused the
    # certificate itself.
    targets = report["render"]["proxy"]["targets"]
    assert {"target": "site-a.test:443"}.items() <= targets[0].items()


# --- every sub-request goes through the address rules ----------------------------------------


def _no_contact(renders: Renders, marker: str) -> None:
    """refused.test logged every connection it got: only its own readiness check (loopback)."""
    lines = renders.refused_log.splitlines()
    assert all(line == "CONNECT-FROM 127.0.0.1" for line in lines), lines
    assert marker not in renders.refused_log


def test_image_from_a_refused_address_is_refused_recorded_and_never_sent(
        renders: Renders, rendernet: RenderNet) -> None:
    report = renders.runs["image"].report
    assert _validated(report).error is None  # the page itself loaded
    url = "http://refused.test/pixel.png?from=img"
    refused = [r for r in report["render"]["refused"] if r["url"] == url]
    assert len(refused) == 1 and refused[0]["code"] == "BLOCKED_TARGET"
    assert "private (192.168.0.0/16)" in refused[0]["reason"] or "private" in refused[0]["reason"]
    # A name's internal address is not the submitter's to learn from a stored report.
    assert rendernet.refused_ip not in json.dumps(report)
    request = next(r for r in report["render"]["requests"] if r["url"] == url)
    assert request["refused"] and request["type"] == "image"
    _no_contact(renders, "from=img")


def test_websocket_to_a_refused_address_is_refused_recorded_and_never_sent(
        renders: Renders) -> None:
    report = renders.runs["ws"].report
    render = report["render"]
    assert [r["code"] for r in render["refused"] if r["url"] == "refused.test:80"] == [
        "BLOCKED_TARGET"]
    ws = render["websockets"]
    assert len(ws) == 1 and ws[0]["url"] == "ws://refused.test/ws?from=ws" and ws[0]["error"]
    assert ws[0]["frames_sent"] == 0 and "resolves to a refused address" in ws[0]["refused"]
    _no_contact(renders, "from=ws")


def test_refused_submitted_url_never_starts_a_browser(renders: Renders) -> None:
    run = renders.runs["refused_top"]
    report = _validated(run.report)
    assert report.error is not None and report.error.code == "BLOCKED_TARGET"
    assert report.final_url is None and run.report["render"]["requests"] == []
    _no_contact(renders, "REQUEST")


# --- the screenshot ---------------------------------------------------------------------------


def test_screenshot_is_a_real_image_of_the_page(renders: Renders) -> None:
    shot = renders.runs["login"].report["render"]["screenshot"]
    data = base64.b64decode(shot["base64"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and shot["type"] == "image/png"
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (1280, 720) == (shot["width"], shot["height"])
    rgb = image.convert("RGB")
    # Not blank: the page's blue background and yellow box are both there.
    assert max(ImageStat.Stat(rgb).stddev) > 20
    colours = {rgb.getpixel((x, y)) for x in range(0, 1280, 40) for y in range(0, 720, 40)}
    assert (0x1A, 0x4D, 0x8F) in colours and (0xF4, 0xC2, 0x0D) in colours


def test_full_page_screenshot_stops_at_the_height_cap(renders: Renders) -> None:
    render = renders.runs["image"].report["render"]
    full = render["full_page"]
    assert full is not None, render["screenshot_problem"]
    image = Image.open(io.BytesIO(base64.b64decode(full["base64"])))
    assert image.size == (1280, 2048) == (full["width"], full["height"])
    # The bottom of the capture is well into the gradient towards red, not blank.
    assert image.convert("RGB").getpixel((640, 2040))[0] > 100


# --- the sandbox ------------------------------------------------------------------------------


def test_browser_containers_are_locked_down_gone_and_under_their_memory_limit(
        renders: Renders) -> None:
    settings = renders.settings
    limit = settings.browser_memory_limit_mb * 1024 * 1024
    for key, run in renders.runs.items():
        host = run.inspect["HostConfig"]
        assert run.exit_code == 0, key
        assert run.inspect["Config"]["User"] == "65534:65534"
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"][0] == "no-new-privileges" and host["Privileged"] is False
        # FETCHER_SECCOMP_PROFILE unset: the profile shipped in the package, passed as its text
        assert json.loads(host["SecurityOpt"][1].removeprefix("seccomp=")) == json.loads(
            Path(settings.fetcher_seccomp_profile).read_bytes()) and len(host["SecurityOpt"]) == 2
        assert host["Memory"] == host["MemorySwap"] == limit
        assert host["PidsLimit"] == settings.browser_pids_limit
        assert host["NanoCpus"] == int(settings.container_cpu_limit * 1e9)
        assert host["Tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size="
                                         f"{settings.container_tmpfs_mb}m"}
        assert not host["Binds"] and host["NetworkMode"] == settings.fetcher_network
        assert run.inspect["State"]["OOMKilled"] is False
        assert run.gone, key
        assert run.memory_peak is not None, "no cgroup memory figure readable"
        assert 0 < run.memory_peak < limit, (key, run.memory_peak)
        assert run.seconds < 45, (key, run.seconds)
        print(f"{key}: memory peak {run.memory_peak / 2**20:.0f} MiB, {run.seconds:.1f} s")
    env = renders.runs["login"].inspect["Config"]["Env"]
    assert all(e.startswith(("FETCH_", "PATH=", "PYTHON", "HOME=", "XDG_", "PLAYWRIGHT_",
                             "LANG=")) for e in env), env


def test_chromium_runs_unprivileged_from_a_read_only_root(renders: Renders) -> None:
    probe = renders.probe
    chromium = probe["chromium"]
    assert len(chromium) >= 2, probe  # the browser and at least one child process
    for proc in chromium.values():
        assert proc["Uid"] == ["65534"] * 4
        assert proc["CapEff"] == proc["CapBnd"] == "0000000000000000"
        assert proc["NoNewPrivs"] == "1"
    assert probe["uid"] == 65534
    writes = probe["writes"]
    assert writes["/tmp/ok"] == 0
    assert writes["/app/sandbox/render/planted.py"] == 30  # EROFS
    assert writes["/usr/bin/planted"] in (13, 30)
