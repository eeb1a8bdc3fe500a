"""The api process's own settings (environment), and bearer tokens.

Tokens are configured hashed: `API_TOKENS` is a comma-separated list of
`name:sha256-hex-of-the-token:scope+scope[:tenant]` entries (scopes `submit`, `read`,
`operate`), made by `safeurl-worker token NAME --scopes submit,read [--tenant T]`. The token
itself is never stored. A token bound to a tenant submits scans of that tenant only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..config import TENANT_PATTERN, ConfigError, port_list
from ..fetcher import netcheck

SCOPES = ("submit", "read", "operate")
_ENTRY = re.compile(r"^([A-Za-z0-9_.-]{1,64}):([0-9a-f]{64}):([a-z+]+)(?::([^:]*))?$")


def hash_token(token: str) -> str:
    """Tokens are random and long (see `new_token`), so a plain SHA-256 is enough."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ApiToken:
    name: str
    sha256: str
    scopes: frozenset[str]
    tenant: str | None = None  # its submissions are this tenant's (and only this tenant's)


def parse_tokens(spec: str) -> list[ApiToken]:
    """Parse API_TOKENS; raises ValueError naming the bad entry."""
    tokens: list[ApiToken] = []
    for raw in (e.strip() for e in spec.split(",")):
        if not raw:
            continue
        m = _ENTRY.match(raw)
        if m is None:
            shown = raw.split(":", 1)[0]
            raise ValueError(f"entry {shown!r}: want name:sha256-hex:scope+scope[:tenant]")
        scopes = frozenset(m.group(3).split("+"))
        unknown = scopes - set(SCOPES)
        if unknown:
            raise ValueError(f"entry {m.group(1)!r}: unknown scope(s) {sorted(unknown)}")
        tenant = m.group(4)
        if tenant is not None and not re.match(TENANT_PATTERN, tenant):
            raise ValueError(f"entry {m.group(1)!r}: {tenant!r} is not a tenant name")
        tokens.append(ApiToken(m.group(1), m.group(2), scopes, tenant))
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ValueError("token names must be unique")
    return tokens


def find_token(tokens: list[ApiToken], presented: str) -> ApiToken | None:
    digest = hash_token(presented)
    found = None
    for t in tokens:  # compare with every entry, in constant time each
        if hmac.compare_digest(t.sha256, digest):
            found = t
    return found


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore",
                                      frozen=True)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_tokens: str = ""
    api_max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    api_rate_limit_per_min: int = Field(default=600, ge=0)  # per token; 0: no limit
    api_page_max: int = Field(default=200, ge=1, le=10_000)
    # Signs console sessions; the same on every replica. Empty: a random key per process
    # (sessions then end at a restart and work only on the replica that issued them).
    api_session_secret: str = ""
    # Mark the console's cookies Secure although requests arrive over plain http (TLS ends at
    # a proxy in front); over https they always are.
    api_secure_cookies: bool = False

    callback_secret: str = ""  # HMAC key of the signature; callbacks are off without it
    callback_default_url: str = ""  # for jobs without their own callback_url
    # The workers' terminal writes NOTIFY safeurl_scan_finished. Off by default: PostgreSQL
    # serialises notifying commits, which halved the write rate of 32 concurrent writers
    # (docs/contract.md). Like CALLBACK_DEFAULT_URL, it is read by `run` (and `api`).
    notify_finished: bool = False
    callback_allowed_ports: str = "80,443"
    callback_allow_cidrs: str = ""  # like FETCH_ALLOW_CIDRS: an operator's exception list
    callback_max_attempts: int = Field(default=12, ge=1)
    callback_timeout_s: float = Field(default=10, gt=0, le=120)
    callback_backoff_base_s: float = Field(default=2, gt=0)
    callback_backoff_cap_s: float = Field(default=3600, gt=0)

    @field_validator("api_tokens")
    @classmethod
    def _tokens(cls, v: str) -> str:
        parse_tokens(v)
        return v

    @field_validator("callback_secret", "api_session_secret")
    @classmethod
    def _secret(cls, v: str) -> str:
        # An HMAC key short enough to guess protects nothing (`openssl rand -hex 32`).
        if v and len(v) < 16:
            raise ValueError("at least 16 characters when set")
        return v

    @field_validator("callback_allowed_ports")
    @classmethod
    def _ports(cls, v: str) -> str:
        return port_list(v)

    @field_validator("callback_allow_cidrs")
    @classmethod
    def _cidrs(cls, v: str) -> str:
        netcheck.parse_cidrs(v)
        return v

    @property
    def tokens(self) -> list[ApiToken]:
        return parse_tokens(self.api_tokens)

    @property
    def ports(self) -> list[int]:
        return [int(p) for p in self.callback_allowed_ports.split(",")]

    @property
    def allow(self) -> list[netcheck.IPNetwork]:
        return netcheck.parse_cidrs(self.callback_allow_cidrs)


def load_api_settings() -> ApiSettings:
    """ApiSettings from the environment; a bad value is a ConfigError naming the variable."""
    try:
        return ApiSettings()
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
                    for e in exc.errors()]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
