"""Configuration: contract defaults, and one clear error naming the variable."""

from __future__ import annotations

import re

import pytest

from safeurl_worker.config import ConfigError, load_settings


def test_contract_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "DATABASE_URL", "WORKER_ID", "WORKER_CONCURRENCY",
                 "FETCHER_NETWORK", "FETCHER_SECCOMP_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert (s.redis_host, s.redis_port, s.redis_password) == ("localhost", 6379, "")
    assert s.redis_dsn == "redis://localhost:6379/0"
    assert s.database_url == "postgresql://localhost/safeurl"
    assert s.docker_socket_path == "/var/run/docker.sock"
    assert s.fetcher_image == "safeurl-fetcher:latest"
    # The sandbox's own network (scripts/services.sh, compose.yaml), not Docker's `bridge`, and
    # the seccomp profile shipped in the package, not the daemon's.
    assert s.fetcher_network == "safeurl-fetch"
    assert s.fetcher_seccomp_profile.endswith("/safeurl_worker/data/seccomp-default.json")
    assert s.worker_concurrency == 5
    assert s.container_timeout_ms == 30000
    assert s.container_memory_limit_mb == 512
    assert s.container_cpu_limit == 0.5
    assert s.metrics_port == 9400
    assert (s.scan_stream, s.scan_group) == ("scan-jobs", "scan-workers")
    assert s.dead_letter_stream == "scan-jobs:dead"
    assert (s.lease_renew_ms, s.lease_timeout_ms, s.max_deliveries, s.max_attempts) == (
        5000, 15000, 5, 3)
    host, _, pid = s.worker_id.rpartition("-")
    assert host and pid.isdigit()


def test_redis_url_wins_and_password_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "r1")
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    assert load_settings().redis_dsn == "redis://:s3cret@r1:6379/0"
    monkeypatch.setenv("REDIS_TLS", "true")  # a managed Redis: TLS to the same host and port
    assert load_settings().redis_dsn == "rediss://:s3cret@r1:6379/0"
    monkeypatch.setenv("REDIS_URL", "redis://other:6380/2")
    assert load_settings().redis_dsn == "redis://other:6380/2"


@pytest.mark.parametrize("name,value", [
    ("WORKER_CONCURRENCY", "abc"),
    ("WORKER_CONCURRENCY", "0"),
    ("REDIS_PORT", "70000"),
    ("CONTAINER_CPU_LIMIT", "-1"),
    ("CONTAINER_TIMEOUT_MS", "10"),
    ("DATABASE_URL", "mysql://x/y"),
    ("REDIS_URL", "http://x"),
    ("FETCH_ALLOWED_PORTS", "80,http"),
    ("FETCH_ALLOW_CIDRS", "10.0.0.0/33"),
    ("FETCHER_DNS", "1.1.1.1,dns.example"),
    ("FETCHER_USER_AGENT", "Agent\r\nX-Injected: 1"),
    ("FETCHER_NETWORK", ""),
    ("FETCHER_SECCOMP_PROFILE", "unconfined"),  # only a file or `daemon`
    ("LOG_FORMAT", "xml"),
    ("LOG_LEVEL", "loud"),
])
def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str,
                                          value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert name in str(err.value)
    assert "\n" not in str(err.value)


def test_inconsistent_lease_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASE_RENEW_MS", "20000")
    with pytest.raises(ConfigError, match="LEASE_RENEW_MS"):
        load_settings()


def test_fetcher_env_carries_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:pw@db/safeurl")
    env = load_settings().fetcher_env()
    assert set(env) == {"FETCH_ALLOWED_PORTS", "FETCH_ALLOW_CIDRS", "FETCH_MAX_REDIRECTS",
                        "FETCH_MAX_BYTES", "FETCH_TIMEOUT_S", "FETCH_USER_AGENT",
                        "FETCH_MAX_OUTPUT_BYTES"}
    assert env["FETCH_USER_AGENT"].startswith("Mozilla/5.0")
    assert env["FETCH_MAX_OUTPUT_BYTES"] == str(load_settings().container_output_max_bytes)
    assert not any("s3cret" in v or "pw@" in v for v in env.values())


def test_fetch_deadline_is_inside_the_container_timeout() -> None:
    s = load_settings(container_timeout_ms=30000)
    assert 0 < s.fetch_timeout_s < 30


def test_lanes_are_validated_with_a_clear_message() -> None:
    assert load_settings().lane_weights == {"interactive": 6, "default": 3, "bulk": 1}
    for bad, says in [("bulk:1", "must include `default`"), ("default:0", "whole number 1-1000"),
                      ("default:1,default:2", "listed twice"), ("dead:1,default:1", "names are"),
                      ("Big:1,default:1", "names are")]:
        with pytest.raises(ConfigError, match=f"LANES: .*{re.escape(says)}"):
            load_settings(lanes=bad)


def test_a_tenants_quota_entry_overrides_only_what_it_sets() -> None:
    s = load_settings(tenant_max_queued=100, tenant_max_in_flight=4,
                      tenant_quotas='{"acme": {"max_in_flight": 9}, "big": {"max_queued": 0}}')
    assert (s.quota("acme").max_queued, s.quota("acme").max_in_flight) == (100, 9)
    assert (s.quota("big").max_queued, s.quota("big").max_in_flight) == (0, 4)
    assert (s.quota("other").max_queued, s.quota("other").max_in_flight) == (100, 4)
    for bad in ['{"acme": 3}', '[1]', '{"bad name": {}}', '{"a": {"max_queued": -1}}',
                '{"a": {"max_queud": 1}}', "not json"]:
        with pytest.raises(ConfigError, match="TENANT_QUOTAS"):
            load_settings(tenant_quotas=bad)
