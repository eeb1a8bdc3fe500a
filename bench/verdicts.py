"""`python -m bench.verdicts`: how good are the verdicts? Every labelled page, scanned for real.

Each page (bench/verdict_pages.py: the project's synthetic pages, and ../shared/corpus when it is
there) is served at its own host name by a test host container on an internal docker network the
command creates (one network alias per host name, so a page and its URL agree as in the wild).
Each URL then goes through the real fetcher image with the worker's own container settings
(safeurl_worker.runner, allowed to reach only that network) and safeurl_worker.analysis.analyze.

It prints, per class (phish / benign) and source (shared / synthetic), how many pages were
malicious, suspicious, safe, unknown or got no verdict, the rates the targets are about, and
every miss and false alarm with its URL and signals. Figures are reported, not asserted: the exit
status is 0 whenever the run completed.

Pages are split in two halves by a hash of their group (a synthetic brand's pages together, each
shared page on its own): rules are tuned on `--split tune`; the published figures are `report`.
The network, the test host and every fetcher container are removed at the end, also on Ctrl-C
or SIGTERM. Concurrency and the total time are bounded by the arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, cast

import aiodocker

from safeurl_worker.analysis import analyze
from safeurl_worker.config import Settings
from safeurl_worker.runner import LABEL_WORKER, DockerUnavailable, Runner, RunStatus

from .verdict_pages import Page, all_pages, ascii_host

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"
BENCH_LABEL = "safeurl.bench=verdicts"
OUTCOMES = ("malicious", "suspicious", "safe", "unknown", "failed")
# Published targets (issue 12), printed beside the figures for reference; never asserted.
TARGETS = {"phish_detected": 95.0, "phish_malicious": 85.0, "benign_malicious": 0.0,
           "benign_suspicious": 3.0}


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"docker {' '.join(args[:3])}: {out.stderr.strip()[:500]}")
    return out.stdout.strip()


# --- the test host ------------------------------------------------------------------------------

_META_REFRESH = re.compile(rb"""<meta[^>]+http-equiv\s*=\s*["']?refresh[^>]*>""", re.I)
_REFRESH_URL = re.compile(rb"""url\s*=\s*['"]?([^'" >]+)""", re.I)


def refresh_hosts(page: Page) -> set[str]:
    """Hosts a page's <meta refresh> sends the fetcher to. They become aliases of the test host
    too, so the fetcher never looks up a name outside the test network (docker's DNS would
    forward it to the host's resolver)."""
    hosts = set()
    for tag in _META_REFRESH.findall(page.body):
        m = _REFRESH_URL.search(tag)
        if m:
            target = urllib.parse.urljoin(page.url, m.group(1).decode("latin-1"))
            parts = urllib.parse.urlsplit(target)
            if parts.scheme in ("http", "https") and parts.hostname:
                hosts.add(ascii_host(parts.hostname))
    return hosts


def make_tls(workdir: Path, names: list[str]) -> Path:
    """A throw-away CA and one certificate for every page host, so pages are also served over
    https with a certificate the fetcher verifies (it is told to trust only this CA). Returns
    the CA certificate; the host's key and certificate go to `workdir/tls`."""
    if shutil.which("openssl") is None:
        raise SystemExit("bench.verdicts needs the openssl command (apt-get install openssl)")
    tls = workdir / "tls"
    tls.mkdir()
    ca_key, ca = workdir / "ca.key", workdir / "ca.pem"

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], capture_output=True, check=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca), "-days", "2", "-subj", "/CN=safeurl bench.verdicts CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ext = workdir / "leaf.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid\nsubjectAltName="
                   + ",".join(f"DNS:{n}" for n in names) + "\n")
    csr = workdir / "leaf.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tls / "key.pem"),
            "-out", str(csr), "-subj", "/CN=safeurl bench.verdicts host")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(tls / "cert.pem"), "-days", "2", "-extfile", str(ext))
    for f in (ca, tls / "cert.pem", tls / "key.pem"):
        f.chmod(0o644)  # read inside containers by other users; the whole dir is temporary
    return ca


def page_key(url: str) -> str:
    """How the test host finds a page: DNS host name and percent-decoded path."""
    parts = urllib.parse.urlsplit(url)
    return f"{ascii_host(parts.hostname or '')} {urllib.parse.unquote(parts.path or '/')}"


@dataclasses.dataclass
class PageHost:
    """One container answering for every page host, on an internal network of its own."""

    network: str
    container: str
    subnet: str = ""
    ca: Path | None = None  # the CA certificate fetchers must trust for the https pages
    workdir: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def create(cls, pages: list[Page], image: str) -> PageHost:
        name = f"safeurl-verdicts-{uuid.uuid4().hex[:8]}"
        host = cls(name, f"{name}-host", workdir=tempfile.TemporaryDirectory(prefix=name))
        try:
            host._start(pages, image)
        except BaseException:
            host.remove()
            raise
        return host

    def _write_pages(self, pages: list[Page]) -> Path:
        assert self.workdir is not None
        root = Path(self.workdir.name)
        index: dict[str, dict[str, str]] = {}
        for i, page in enumerate(pages):
            (root / f"{i:05d}.html").write_bytes(page.body)
            index[page_key(page.url)] = {"file": f"{i:05d}.html", "type": page.content_type}
        (root / "index.json").write_text(json.dumps(index))
        (root / "verdict_host.py").write_bytes((Path(__file__).parent / "verdict_host.py")
                                               .read_bytes())
        root.chmod(0o755)  # mkdtemp makes it 0700; fetchers (uid 65534) read the CA in it
        return root

    def _start(self, pages: list[Page], image: str) -> None:
        root = self._write_pages(pages)
        names = sorted({ascii_host(p.host) for p in pages}.union(*map(refresh_hosts, pages)))
        self.ca = make_tls(root, names)
        docker("network", "create", "--internal", "--label", BENCH_LABEL, self.network)
        aliases = [arg for n in names for arg in ("--network-alias", n)]
        docker("run", "-d", "--name", self.container, "--network", self.network, *aliases,
               "--label", BENCH_LABEL, "--user", "0", "--entrypoint", "python3",
               "-v", f"{root}:/pages:ro", image, "/pages/verdict_host.py", "/pages")
        docker("exec", self.container, "python3", "-c",
               "import time, urllib.request\n"
               "for _ in range(100):\n"
               "    try: urllib.request.urlopen('http://127.0.0.1/', timeout=1); break\n"
               "    except urllib.error.HTTPError: break\n"
               "    except OSError: time.sleep(0.1)\n")
        self.subnet = docker("network", "inspect", self.network, "-f",
                             "{{(index .IPAM.Config 0).Subnet}}")

    def remove(self) -> None:
        docker("rm", "-f", self.container, check=False)
        docker("network", "rm", self.network, check=False)
        if self.workdir is not None:
            self.workdir.cleanup()


def remove_fetchers(worker_id: str) -> None:
    """Any fetcher container of this run still there (the runner removes its own; this is the
    net under it for a run cut short)."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL_WORKER}={worker_id}", check=False)
    if ids:
        docker("rm", "-f", *ids.split(), check=False)


# --- scanning -----------------------------------------------------------------------------------

CA_IN_CONTAINER = "/etc/safeurl-bench-ca.pem"


class _TrustingContainers:
    """`docker.containers` whose `create` adds one thing to the worker's container settings:
    the benchmark's CA, bind-mounted read-only and named by SSL_CERT_FILE, so OpenSSL in the
    fetcher trusts that CA (and nothing else) and the https pages verify as real ones would."""

    def __init__(self, containers: Any, ca: Path) -> None:
        self._containers = containers
        self._ca = ca

    async def create(self, config: dict[str, Any], **kwargs: Any) -> Any:
        binds = [*config["HostConfig"].get("Binds", []), f"{self._ca}:{CA_IN_CONTAINER}:ro"]
        host_config = {**config["HostConfig"], "Binds": binds}
        config = {**config, "Env": [*config["Env"], f"SSL_CERT_FILE={CA_IN_CONTAINER}"],
                  "HostConfig": host_config}
        return await self._containers.create(config=config, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._containers, name)


class _TrustingDocker:
    def __init__(self, client: aiodocker.Docker, ca: Path) -> None:
        self._client = client
        self.containers = _TrustingContainers(client.containers, ca)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@dataclasses.dataclass
class Outcome:
    page: Page
    verdict: str = "failed"  # a Verdict value, or "failed" (no report), or "not_run"
    detail: str = ""  # why there is no verdict
    score: int | None = None
    signals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    http_status: int | None = None
    error_code: str | None = None
    seconds: float = 0.0
    analysis: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rest (confidence...)

    def as_json(self) -> dict[str, Any]:
        p = self.page
        return {"id": p.id, "label": p.label, "source": p.source, "url": p.url,
                "brand": p.brand, "style": p.style, "split": p.split, "verdict": self.verdict,
                "detail": self.detail, "score": self.score, "signals": self.signals,
                "http_status": self.http_status, "error_code": self.error_code,
                "seconds": round(self.seconds, 2), "analysis": self.analysis}


async def scan(runner: Runner, page: Page) -> Outcome:
    """One page through the real fetcher container and the analysis."""
    try:
        res = await runner.run(uuid.uuid4(), page.url)
    except (DockerUnavailable, aiodocker.DockerError) as exc:
        return Outcome(page, detail=f"docker: {exc}"[:300])
    if res.status is not RunStatus.OK or res.report is None:
        return Outcome(page, detail=f"{res.status.value}: {res.detail}"[:300],
                       seconds=res.seconds)
    # As the worker scores a report (pipeline.py), with its thresholds and no blocklist.
    settings = runner.settings
    analysis = analyze(page.url, res.report, suspicious_threshold=settings.suspicious_threshold,
                       malicious_threshold=settings.malicious_threshold)
    return Outcome(page, analysis.verdict.value, score=analysis.score,
                   signals=[s.model_dump() for s in analysis.signals],
                   http_status=res.report.http_status,
                   error_code=res.report.error.code if res.report.error else None,
                   seconds=res.seconds,
                   analysis=analysis.model_dump(mode="json",
                                                exclude={"verdict", "score", "signals"}))


async def scan_all(pages: list[Page], settings: Settings, concurrency: int,
                   deadline_s: float, ca: Path) -> list[Outcome]:
    """Scan `pages`, `concurrency` at a time; pages not started by the deadline are not run."""
    sem = asyncio.Semaphore(concurrency)
    stop_at = time.monotonic() + deadline_s
    done = 0

    async def one(page: Page) -> Outcome:
        nonlocal done
        async with sem:
            if time.monotonic() > stop_at:
                return Outcome(page, "not_run", detail="the run's time was up")
            out = await scan(runner, page)
            done += 1
            if done % 25 == 0:
                print(f"  {done}/{len(pages)} scanned", file=sys.stderr, flush=True)
            return out

    async with aiodocker.Docker(url=f"unix://{settings.docker_socket_path}") as client:
        runner = Runner(settings, cast(aiodocker.Docker, _TrustingDocker(client, ca)))
        tasks = [asyncio.create_task(one(p)) for p in pages]
        try:
            # Room for the scans already running when the deadline passes to finish.
            async with asyncio.timeout(deadline_s + settings.container_timeout_ms / 1000 + 30):
                return list(await asyncio.gather(*tasks))
        except TimeoutError:
            return [t.result() if t.done() and not t.cancelled() else
                    Outcome(t_page, "not_run", detail="the run's time was up")
                    for t, t_page in zip(tasks, pages, strict=True)]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # runners remove containers


# --- figures ------------------------------------------------------------------------------------


def _pct(n: int, total: int) -> float:
    return round(100.0 * n / total, 1) if total else 0.0


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts and rates per (class, source) and per class over all sources. Rates are over all
    pages of the group that were run (a failed scan counts as neither detected nor clean)."""
    rows: dict[str, Any] = {}
    run = [o for o in outcomes if o.verdict != "not_run"]
    for label in ("phish", "benign"):
        for source in ("shared", "synthetic", "all"):
            group = [o for o in run if o.page.label == label
                     and source in ("all", o.page.source)]
            counts = Counter(o.verdict for o in group)
            n = len(group)
            row: dict[str, Any] = {"pages": n, **{k: counts.get(k, 0) for k in OUTCOMES}}
            row["rates"] = {k: _pct(counts.get(k, 0), n) for k in OUTCOMES}
            row["rates"]["detected"] = _pct(counts["malicious"] + counts["suspicious"], n)
            rows[f"{label}/{source}"] = row
    styles = sorted({(o.page.label, o.page.style) for o in run})
    by_style = {f"{lb}/{st}": dict(Counter(o.verdict for o in run
                                           if (o.page.label, o.page.style) == (lb, st)))
                for lb, st in styles}
    fired = {label: dict(Counter(s["name"] for o in run if o.page.label == label
                                 for s in o.signals).most_common())
             for label in ("phish", "benign")}
    return {"rows": rows, "by_style": by_style, "signals": fired,
            "not_run": len(outcomes) - len(run),
            "headline": {
                "phish_detected": rows["phish/all"]["rates"]["detected"],
                "phish_malicious": rows["phish/all"]["rates"]["malicious"],
                "benign_malicious": rows["benign/all"]["rates"]["malicious"],
                "benign_suspicious": rows["benign/all"]["rates"]["suspicious"],
                "benign_unknown": rows["benign/all"]["rates"]["unknown"]}}


def _signals(o: Outcome) -> str:
    return ", ".join(f"{s['name']}({s['weight']})" for s in o.signals) or "no signals"


def _listing(title: str, outcomes: Iterable[Outcome]) -> Iterator[str]:
    items = sorted(outcomes, key=lambda o: (o.page.source, o.verdict, o.page.id))
    yield f"{title}: {len(items)}"
    for o in items:
        score = "-" if o.score is None else str(o.score)
        why = o.detail if o.verdict in ("failed", "not_run") else _signals(o)
        yield f"  {o.verdict:<10} {score:>3}  {o.page.url}  [{o.page.id}]"
        yield f"             {why}"


def render(summary: dict[str, Any], outcomes: list[Outcome]) -> str:
    lines = [f"{'class':<7}{'source':<11}{'pages':>6}" + "".join(f"{k:>16}" for k in OUTCOMES)]
    for key, row in summary["rows"].items():
        if not row["pages"]:
            continue
        label, source = key.split("/")
        cells = "".join(f"{row[k]:>7} ({row['rates'][k]:5.1f}%)" for k in OUTCOMES)
        lines.append(f"{label:<7}{source:<11}{row['pages']:>6}{cells}")
    h = summary["headline"]
    lines += ["",
              f"phishing detected (malicious or suspicious): {h['phish_detected']:.1f}% "
              f"(target >= {TARGETS['phish_detected']:.0f}%); malicious: "
              f"{h['phish_malicious']:.1f}% (target >= {TARGETS['phish_malicious']:.0f}%)",
              f"benign malicious: {h['benign_malicious']:.1f}% (target 0); suspicious: "
              f"{h['benign_suspicious']:.1f}% (target <= {TARGETS['benign_suspicious']:.0f}%); "
              f"unknown: {h['benign_unknown']:.1f}%"]
    lines.append("")
    for key, counts in summary["by_style"].items():
        cells = ", ".join(f"{k} {counts[k]}" for k in OUTCOMES if counts.get(k))
        lines.append(f"  {key:<24}{sum(counts.values()):>5}  {cells}")
    for label, fired in summary["signals"].items():
        lines.append(f"signals on {label} pages: "
                     + (", ".join(f"{k} {v}" for k, v in fired.items()) or "none"))
    if summary["not_run"]:
        lines.append(f"not run (time was up): {summary['not_run']} pages")
    phish = [o for o in outcomes if o.page.label == "phish"]
    benign = [o for o in outcomes if o.page.label == "benign"]
    lines += ["", *_listing("missed phishing (safe, unknown or no verdict)",
                            (o for o in phish if o.verdict in ("safe", "unknown", "failed")))]
    lines += ["", *_listing("phishing only suspicious",
                            (o for o in phish if o.verdict == "suspicious"))]
    lines += ["", *_listing("false alarms (benign malicious or suspicious)",
                            (o for o in benign if o.verdict in ("malicious", "suspicious")))]
    lines += ["", *_listing("benign without a verdict (unknown or failed)",
                            (o for o in benign if o.verdict in ("unknown", "failed")))]
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------


def select(pages: list[Page], split: str, source: str, limit: int | None,
           match: str = "") -> list[Page]:
    chosen = [p for p in pages if split in ("all", p.split) and source in ("all", p.source)
              and (match in p.id or match in p.url)]
    if limit is not None:
        # Both classes in a bounded run: alternate phish and benign pages.
        phish = [p for p in chosen if p.label == "phish"]
        benign = [p for p in chosen if p.label == "benign"]
        mixed = [p for pair in zip(phish, benign, strict=False) for p in pair]
        rest = phish[len(mixed) // 2:] + benign[len(mixed) // 2:]
        chosen = (mixed + rest)[:limit]
    return chosen


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: containers and network go


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.verdicts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("tune", "report", "all"), default="report",
                    help="which half of the pages (default: report, the published figures)")
    ap.add_argument("--source", choices=("shared", "synthetic", "all"), default="all")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                    help="the shared corpus directory (default: ../shared/corpus; skipped when "
                         "absent)")
    ap.add_argument("--limit", type=int, default=None, help="scan at most N pages")
    ap.add_argument("--match", default="",
                    help="only pages whose id or URL contains this text (e.g. paypal, /otp/)")
    ap.add_argument("--json", type=Path, default=None, help="write every page's result here")
    ap.add_argument("--concurrency", type=int, default=2, help="fetcher containers at once")
    ap.add_argument("--container-timeout-ms", type=int, default=30000,
                    help="per scan, as CONTAINER_TIMEOUT_MS (default: the worker's default)")
    ap.add_argument("--deadline-s", type=float, default=1800,
                    help="start no scan after this many seconds (default 1800)")
    ap.add_argument("--image", default=Settings().fetcher_image,
                    help="fetcher image (default: FETCHER_IMAGE or safeurl-fetcher:latest)")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--concurrency and --limit must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    corpus = args.corpus if args.corpus.is_dir() else None
    pages = select(all_pages(corpus), args.split, args.source, args.limit, args.match)
    if not pages:
        print("no pages selected", file=sys.stderr)
        return 1
    worker_id = f"bench-verdicts-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    print(f"scanning {len(pages)} pages (split {args.split}, corpus "
          f"{corpus or 'absent'}), {args.concurrency} at a time", file=sys.stderr, flush=True)
    host = PageHost.create(pages, args.image)
    print(f"network {host.network}; fetcher containers labelled {LABEL_WORKER}={worker_id}",
          file=sys.stderr, flush=True)
    try:
        settings = Settings(fetcher_image=args.image, fetcher_network=host.network,
                            fetch_allow_cidrs=host.subnet, fetch_allowed_ports="80,443",
                            container_timeout_ms=args.container_timeout_ms, worker_id=worker_id)
        assert host.ca is not None
        outcomes = asyncio.run(scan_all(pages, settings, args.concurrency, args.deadline_s,
                                        host.ca))
    finally:
        with contextlib.suppress(Exception):
            remove_fetchers(worker_id)
        host.remove()
    seconds = time.monotonic() - started
    summary = summarize(outcomes)
    print(f"verdicts on split {args.split}: {len(pages)} pages in {seconds:.0f} s "
          f"({args.concurrency} at a time, image {args.image})\n")
    print(render(summary, outcomes))
    if args.json:
        args.json.write_text(json.dumps(
            {"split": args.split, "source": args.source, "seconds": round(seconds, 1),
             "corpus": str(corpus) if corpus else None, "summary": summary,
             "pages": [o.as_json() for o in outcomes]}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the network and containers were removed", file=sys.stderr)
        sys.exit(130)
