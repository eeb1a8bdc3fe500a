"""Configuration from the environment (pydantic-settings).

The first group of names is the contract with existing deployments; do not rename them.
An invalid value stops start-up with one message naming the variable (see `load_settings`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import re
import socket
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .fetcher.fetch import USER_AGENT as DEFAULT_USER_AGENT

# Lane and tenant names: they become parts of stream names and metric labels.
LANE_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RESERVED_LANES = frozenset({"dead", "t"})  # SCAN_STREAM:dead is the dead-letter stream


class ConfigError(Exception):
    """Raised for invalid configuration; the message names the variable."""


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def port_list(v: str) -> str:
    """A comma-separated list of TCP ports, normalised; ValueError names what is wrong."""
    ports = [p.strip() for p in v.split(",") if p.strip()]
    if not ports or not all(p.isdigit() and 0 < int(p) < 65536 for p in ports):
        raise ValueError("must be a comma-separated list of TCP ports")
    return ",".join(ports)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore",
                                      frozen=True)

    # --- contract names used by the existing deployment ---
    redis_host: str = "localhost"
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_password: str = ""
    redis_tls: bool = False  # rediss:// to REDIS_HOST:REDIS_PORT (managed Redis)
    redis_url: str = ""  # wins over host/port/password/tls when set
    database_url: str = "postgresql://localhost/safeurl"
    docker_socket_path: str = "/var/run/docker.sock"
    fetcher_image: str = "safeurl-fetcher:latest"
    worker_concurrency: int = Field(default=5, ge=1, le=1000)
    container_timeout_ms: int = Field(default=30000, ge=1000, le=600_000)
    container_memory_limit_mb: int = Field(default=512, ge=32, le=65536)
    container_cpu_limit: float = Field(default=0.5, gt=0, le=64)
    metrics_port: int = Field(default=9400, ge=0, le=65535)

    # --- stream and identity ---
    scan_stream: str = Field(default="scan-jobs", min_length=1)
    scan_group: str = Field(default="scan-workers", min_length=1)
    dead_letter_stream: str = Field(default="scan-jobs:dead", min_length=1)
    dead_letter_maxlen: int = Field(default=100_000, ge=100)  # approximate bound (XADD MAXLEN ~)
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=200)

    # --- leases and recovery ---
    lease_renew_ms: int = Field(default=5000, ge=100)
    lease_timeout_ms: int = Field(default=15000, ge=500)
    max_deliveries: int = Field(default=5, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    shutdown_grace_s: float = Field(default=25, ge=0)
    read_batch: int = Field(default=50, ge=1, le=1000)
    read_block_ms: int = Field(default=1000, ge=10, le=60_000)
    unknown_job_retries: int = Field(default=3, ge=0)
    unknown_job_delay_ms: int = Field(default=500, ge=0)
    janitor_interval_s: float = Field(default=5, gt=0)
    requeue_after_s: float = Field(default=60, ge=0)
    orphan_after_s: float = Field(default=0, ge=0)  # 0: container timeout + 60 s
    consumer_idle_s: float = Field(default=3600, ge=0)  # forget empty, dead consumers after
    # The janitor prunes finished jobs older than this many days (`prune`); 0: keep everything.
    retention_days: float = Field(default=0, ge=0)

    # --- scheduling (docs/contract.md, "Lanes, tenants and politeness") ---
    # `name:weight` pairs, highest priority first. Each lane is its own stream (`default` is
    # SCAN_STREAM itself, lane L is `SCAN_STREAM:L`), read by smooth weighted round-robin, so a
    # busy lane slows the others down by its weight but never starves them.
    lanes: str = "interactive:6,default:3,bulk:1"
    # At most this many scans of one registrable domain in flight across the fleet; 0: no limit.
    per_domain_concurrency: int = Field(default=2, ge=0, le=10_000)
    # And at least this long between two scans of one domain starting; 0: none.
    per_domain_interval_ms: int = Field(default=0, ge=0, le=3_600_000)
    # How many jobs a replica keeps waiting for their domain (outside the slots) before it
    # stops reading more: a bound on memory, not a limit users should meet.
    max_deferred: int = Field(default=1000, ge=1, le=100_000)
    # Per-tenant quotas: queued (refused at submission beyond it) and in flight across the fleet
    # (not read beyond it); 0: no limit. TENANT_QUOTAS overrides them per tenant, as JSON:
    # {"acme": {"max_queued": 50000, "max_in_flight": 8}}.
    tenant_max_queued: int = Field(default=10_000, ge=0)
    tenant_max_in_flight: int = Field(default=0, ge=0)
    tenant_quotas: str = ""

    # --- fetcher sandbox ---
    # The Docker network of every sandbox container. The default is the isolated one that
    # scripts/services.sh and compose.yaml create (own bridge, no traffic between containers,
    # the firewall of deploy/firewall/); a network that does not exist stops start-up
    # (runner.check_network), never a silent fallback to Docker's shared `bridge`.
    fetcher_network: str = Field(default="safeurl-fetch", min_length=1)
    container_pids_limit: int = Field(default=64, ge=8)
    container_tmpfs_mb: int = Field(default=16, ge=1)
    container_output_max_bytes: int = Field(default=1_048_576, ge=4096)
    fetch_allowed_ports: str = "80,443"
    fetch_allow_cidrs: str = ""
    fetch_max_redirects: int = Field(default=5, ge=0, le=20)
    fetch_max_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    fetch_timeout_ms: int = Field(default=0, ge=0)  # 0: derived from the container timeout
    # A browser's User-Agent: a scanner that announces itself is trivially cloaked against.
    fetcher_user_agent: str = Field(default=DEFAULT_USER_AGENT, min_length=1, max_length=512)
    # DNS servers of fetcher containers (comma-separated IPs); empty: Docker's default. The
    # host's search domains are never inherited (a short name must not become an internal one).
    fetcher_dns: str = ""
    # The OCI runtime of every sandbox container (a name registered with dockerd, e.g. `runsc`
    # for gVisor: a second kernel between the page and the host); empty: the daemon's default.
    fetcher_runtime: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$|^$")
    # The seccomp profile (a JSON file) of every sandbox container, so the filter is the one
    # pinned in the package (data/seccomp-default.json, Docker 20.10.24's default) whatever the
    # daemon's version. Empty: that shipped profile (resolved to its path by the validator);
    # `daemon`: the daemon's built-in profile instead. Never unconfined.
    fetcher_seccomp_profile: str = Field(default="", validate_default=True)
    # Keep created-but-not-started fetcher containers ready, one per free slot (the URL reaches
    # them on stdin): container creation leaves the scan's critical path. docs/sandbox.md
    warm_containers: bool = True
    # Also start them ahead (the fetcher waits for its URL on stdin): container start (~250 ms
    # here) and the fetcher's start-up leave the critical path too; its deadlines start with
    # the URL. On by default since it held through the chaos tests; the cost is one idle
    # fetcher process per free slot (bench part 6, docs/sandbox.md).
    warm_start: bool = True

    # --- browser sandbox (render scans; docs/sandbox.md) ---
    browser_image: str = "safeurl-browser:latest"
    # Chromium's processes need far more than the fetcher's 512 MiB.
    browser_memory_limit_mb: int = Field(default=1024, ge=256, le=65536)
    # Counts threads: Chromium, its renderer, GPU and network processes and Playwright's driver
    # run ~130 for one page, so the fetcher's 64 would stop the browser from starting.
    browser_pids_limit: int = Field(default=256, ge=64)
    # A render report carries screenshots and the DOM: its own stdout cap, passed to the image
    # (RENDER_MAX_OUTPUT_BYTES) so the report fits under it by construction.
    browser_output_max_bytes: int = Field(default=4 * 1024 * 1024, ge=65536, le=64 * 1024 * 1024)
    # The mode of a job whose `scan_jobs.mode` is NULL: `static` (the fetcher) or `render`.
    scan_mode: Literal["static", "render"] = "static"
    # `suspicious`: a static scan whose verdict is not clean is scanned again rendered.
    render_on: Literal["", "suspicious"] = ""

    # --- analysis ---
    blocklist_path: str = ""
    brands_path: str = ""  # the operator's brand catalogue, added to the shipped one
    result_cache_ttl_s: int = Field(default=300, ge=0)
    suspicious_threshold: int = Field(default=30, ge=1, le=100)
    malicious_threshold: int = Field(default=70, ge=1, le=100)

    # --- logging ---
    log_level: str = "INFO"
    log_format: str = "json"

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        if v not in ("json", "text"):
            raise ValueError("must be 'json' or 'text'")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        v = v.upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("fetch_allowed_ports")
    @classmethod
    def _ports(cls, v: str) -> str:
        return port_list(v)

    @field_validator("fetcher_seccomp_profile")
    @classmethod
    def _seccomp(cls, v: str) -> str:
        if v == "daemon":
            return v
        v = v or str(pathlib.Path(__file__).with_name("data") / "seccomp-default.json")
        # Read once here, so a missing or broken file stops start-up instead of every scan.
        try:
            profile = json.loads(pathlib.Path(v).read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read a JSON seccomp profile from {v}: {exc}") from exc
        if not isinstance(profile, dict) or "defaultAction" not in profile:
            raise ValueError(f"{v} is not a seccomp profile (no defaultAction)")
        return v

    @field_validator("fetcher_dns")
    @classmethod
    def _dns(cls, v: str) -> str:
        servers = [d.strip() for d in v.split(",") if d.strip()]
        for d in servers:
            ipaddress.ip_address(d)  # raises ValueError with the bad value
        return ",".join(servers)

    @field_validator("fetcher_user_agent")
    @classmethod
    def _user_agent(cls, v: str) -> str:
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("fetch_allow_cidrs")
    @classmethod
    def _cidrs(cls, v: str) -> str:
        cidrs = [c.strip() for c in v.split(",") if c.strip()]
        for c in cidrs:
            ipaddress.ip_network(c, strict=False)  # raises ValueError with the bad value
        return ",".join(cidrs)

    @field_validator("lanes")
    @classmethod
    def _lanes(cls, v: str) -> str:
        parse_lanes(v)  # raises ValueError naming what is wrong
        return v

    @field_validator("tenant_quotas")
    @classmethod
    def _tenant_quotas(cls, v: str) -> str:
        parse_quotas(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.lease_renew_ms >= self.lease_timeout_ms:
            raise ValueError("LEASE_RENEW_MS must be smaller than LEASE_TIMEOUT_MS")
        if self.suspicious_threshold >= self.malicious_threshold:
            raise ValueError("SUSPICIOUS_THRESHOLD must be below MALICIOUS_THRESHOLD")
        return self

    @cached_property
    def lane_weights(self) -> dict[str, int]:
        """Lane -> weight, highest priority first."""
        return parse_lanes(self.lanes)

    @cached_property
    def tenant_quota_map(self) -> dict[str, Quota]:
        return parse_quotas(self.tenant_quotas)  # parsed once: read on every submit and read

    def quota(self, tenant: str) -> Quota:
        """The quotas of one tenant: what its TENANT_QUOTAS entry sets, the defaults for the
        rest."""
        base = Quota(max_queued=self.tenant_max_queued, max_in_flight=self.tenant_max_in_flight)
        own = self.tenant_quota_map.get(tenant)
        if own is None:
            return base
        return base.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})

    @cached_property
    def redis_dsn(self) -> str:
        if self.redis_url:
            return self.redis_url
        auth = f":{self.redis_password}@" if self.redis_password else ""
        scheme = "rediss" if self.redis_tls else "redis"
        return f"{scheme}://{auth}{self.redis_host}:{self.redis_port}/0"

    @cached_property
    def fetch_timeout_s(self) -> float:
        """The fetcher's own deadline: shorter than the container's so a slow target still
        produces a report instead of a kill."""
        if self.fetch_timeout_ms:
            return self.fetch_timeout_ms / 1000
        return max(0.5, self.container_timeout_ms / 1000 * 0.7 - 1)

    def fetcher_env(self) -> dict[str, str]:
        """The only environment a fetcher container gets: limits, never credentials."""
        return {
            "FETCH_ALLOWED_PORTS": self.fetch_allowed_ports,
            "FETCH_ALLOW_CIDRS": self.fetch_allow_cidrs,
            "FETCH_MAX_REDIRECTS": str(self.fetch_max_redirects),
            "FETCH_MAX_BYTES": str(self.fetch_max_bytes),
            "FETCH_TIMEOUT_S": f"{self.fetch_timeout_s:.3f}",
            "FETCH_USER_AGENT": self.fetcher_user_agent,
            # The fetcher cuts its report to the size the runner reads.
            "FETCH_MAX_OUTPUT_BYTES": str(self.container_output_max_bytes),
        }


class Quota(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_queued: int = Field(default=0, ge=0)  # 0: no limit
    max_in_flight: int = Field(default=0, ge=0)


def parse_lanes(v: str) -> dict[str, int]:
    """`interactive:6,default:3,bulk:1` -> {lane: weight}; ValueError says what is wrong."""
    lanes: dict[str, int] = {}
    for part in (p.strip() for p in v.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        name = name.strip()
        if not re.match(LANE_PATTERN, name) or name in RESERVED_LANES:
            raise ValueError(f"lane {name!r}: names are lower-case letters, digits, - and _ "
                             f"(not {', '.join(sorted(RESERVED_LANES))})")
        if not weight.strip().isdigit() or not 1 <= int(weight) <= 1000:
            raise ValueError(f"lane {name!r}: the weight must be a whole number 1-1000")
        if name in lanes:
            raise ValueError(f"lane {name!r} is listed twice")
        lanes[name] = int(weight)
    if "default" not in lanes:
        raise ValueError("the lanes must include `default` (the plain SCAN_STREAM)")
    return lanes


def parse_quotas(v: str) -> dict[str, Quota]:
    if not v.strip():
        return {}
    try:
        raw = json.loads(v)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError('must be a JSON object: {"tenant": {"max_queued": n, ...}}')
    quotas = {}
    for tenant, q in raw.items():
        if not re.match(TENANT_PATTERN, tenant):
            raise ValueError(f"tenant {tenant!r} is not a valid tenant name")
        quotas[tenant] = Quota.model_validate(q)
    return quotas


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment, turning validation errors into one clear message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]).upper() or "configuration"
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            problems.append(f"{name}: {err['msg']}{shown}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
