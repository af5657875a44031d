"""Configuration: YAML -> ${VAR} expansion -> pydantic models.

Every problem is reported with its YAML path and never with the offending value,
since values may be secrets."""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)

from proxy.providers.registry import DEFAULT, PROVIDERS

PERIODS = ("none", "hour", "day", "week", "month")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


class ConfigError(Exception):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path or '<root>'}: {msg}" for path, msg in problems))


def key_digest(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError("not a duration; use e.g. 90s, 10m, 2h, 1d or a number of seconds")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a finite number of seconds >= 0")
    return seconds


def positive_duration(value: Any) -> float:
    """parse_duration, refusing 0 s."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0 s")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    base_url: str = ""  # not given: the provider's default_base_url (ProxyConfig fills it in)
    api_key: SecretStr = SecretStr("")
    timeout_seconds: float = Field(600.0, gt=0)  # the wait for response headers, and each gap between body bytes
    max_duration_seconds: float = Field(3600.0, gt=0)  # a whole response, headers and body
    connect_timeout_seconds: float = Field(10.0, gt=0)
    max_connections: int = Field(1000, gt=0)
    pool_timeout_seconds: float = Field(10.0, gt=0)  # the wait for a connection when all max_connections are busy
    ca_bundle: str | None = None  # a PEM file of CAs for https upstreams (else the system's; SSL_CERT_FILE honoured)
    proxy: str | None = None  # http://HOST:PORT egress proxy (wins over HTTPS_PROXY / HTTP_PROXY / NO_PROXY)
    http2: bool = False  # HTTP/2 to the upstream: streams share connections (proxy/http2.py)

    @model_validator(mode="after")
    def _http2_direct(self) -> "UpstreamConfig":
        if self.http2 and self.proxy:
            raise ValueError("http2: true cannot go through an egress proxy (proxy:); use one or the other")
        return self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018  (a bad port raises)
        except ValueError:
            raise ValueError("must be http://HOST:PORT") from None
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("must be http://HOST:PORT")
        return v.rstrip("/")

    @field_validator("ca_bundle")
    @classmethod
    def _readable_file(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"no such file: {v}")
        return v


def _known_provider(name: str) -> str:
    """An upstream is named after the provider that speaks its API (proxy/providers/registry.py)."""
    if name not in PROVIDERS:
        raise ValueError(f"not a known provider; use one of: {', '.join(sorted(PROVIDERS))}")
    return name


ProviderName = Annotated[str, AfterValidator(_known_provider)]


def _budget_limits() -> Any:
    """A budget's limits, one per dimension (proxy/dimensions.py, declared there once): a count is
    an int, an amount with a scale (cost_usd, in USD) a decimal, both >= 0; the wall clock a duration."""
    from pydantic import create_model

    from proxy import dimensions

    limits: dict[str, Any] = {d.name: (Decimal | None if d.scale != 1 else int | None, Field(None, ge=0))
                              for d in dimensions.METERED}
    return create_model("BudgetLimits", __base__=_Strict, **limits,
                        **{dimensions.WALL_CLOCK.name: (float | None, None)})


class Budget(_budget_limits()):  # type: ignore[misc]
    """A key's or team's limits (None: unlimited) and the period they reset on."""

    period: Literal["none", "hour", "day", "week", "month"] = "none"

    @field_validator("wall_clock", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)


def run_budget_without_period(v: Budget | None) -> Budget | None:
    """A run budget as given, refused when it has a period."""
    if v is not None and v.period != "none":
        raise ValueError("a run budget has no period: a run's budget lasts as long as the run")
    return v


RunBudget = Annotated[Budget | None, AfterValidator(run_budget_without_period)]


class KeyConfig(_Strict):
    key: SecretStr | None = None
    key_sha256: str | None = None
    budget: Budget = Budget()
    # Each agent run's own budget (x-budget-run: RUN_ID), enforced with the key's and team's.
    run_budget: RunBudget = None
    runs: Literal["optional", "required"] = "optional"
    models: list[str] | None = None

    @field_validator("key_sha256")
    @classmethod
    def _digest_form(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256.match(v):
            raise ValueError('must be "sha256:" followed by 64 lower-case hex digits')
        return v

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        has_key = self.key is not None and self.key.get_secret_value() != ""
        if has_key == (self.key_sha256 is not None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def digest(self) -> str:
        return self.key_sha256 or key_digest(self.key.get_secret_value())  # type: ignore[union-attr]


class TeamConfig(_Strict):
    budget: Budget = Budget()
    keys: dict[str, KeyConfig] = {}


class AdmissionConfig(_Strict):
    clamp_max_tokens: bool = True
    input_estimate: Literal["heuristic", "count_tokens"] = "heuristic"
    unpriced_models: Literal["deny", "allow"] = "deny"
    run_ttl: float = 7 * 86400  # a run scope is forgotten this long after its last request

    @field_validator("run_ttl", mode="before")
    @classmethod
    def _ttl(cls, v: Any) -> float:
        return positive_duration(v)


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)


class ServerConfig(_Strict):
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    # Peers whose x-forwarded-for / x-forwarded-proto are believed (the dashboard's login throttle
    # and Secure cookie): IP addresses or CIDR networks. Default: none.
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _ip_networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        out, bad = [], []
        for i, item in enumerate(v):
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                bad.append(str(i))
        if bad:
            which = f"item {bad[0]} is" if len(bad) == 1 else f"items {', '.join(bad)} are"
            raise ValueError(f"{which} not an IP address or CIDR network (e.g. 10.0.0.5 or 10.0.0.0/8)")
        return out


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class WebhookConfig(_Strict):
    """One alert receiver (docs/configuration.md, "alerts"; proxy/alerting.py sends to it)."""

    url: str
    thresholds: list[float] = [0.8, 0.95]  # fractions of a limit, each in (0, 1]; [] : budget.exceeded only
    headers: dict[str, SecretStr] = {}     # sent with every POST; values may be secrets (never logged)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v

    @field_validator("thresholds")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not (math.isfinite(t) and 0 < t <= 1) for t in v):
            raise ValueError("every threshold must be a fraction of the limit in (0, 1], e.g. 0.8")
        return sorted(set(v))

    @field_validator("headers")
    @classmethod
    def _header_fields(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, value in v.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if any(c in value.get_secret_value() for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: the value may not contain a line break")
        return v


class AlertsConfig(_Strict):
    webhooks: list[WebhookConfig] = []


class ProxyConfig(_Strict):
    upstreams: dict[ProviderName, UpstreamConfig] = Field(default_factory=dict)
    alerts: AlertsConfig = AlertsConfig()  # budget threshold / exceeded webhooks (proxy/alerting.py)
    store: str = "sqlite:///data/ledger.db"
    store_retention_days: int = Field(90, ge=0)  # the usage log is pruned after this many days (0: never)
    pricing: str | None = None
    admin_key: SecretStr = SecretStr("")
    metrics_key: SecretStr = SecretStr("")  # when set, /metrics needs Authorization: Bearer <it>
    limits: LimitsConfig = LimitsConfig()
    admission: AdmissionConfig = AdmissionConfig()
    server: ServerConfig = ServerConfig()
    teams: dict[str, TeamConfig] = {}

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if v == "memory://" or v.startswith("sqlite:///"):
            return v
        if v.startswith(("redis://", "rediss://", "redis+sentinel://")):
            from proxy.store.redis import parse_redis_url  # (the message it raises names no password)

            parse_redis_url(v)
            return v
        raise ValueError("must be memory://, sqlite:///PATH, redis://HOST:PORT/DB, rediss://HOST:PORT/DB "
                         "or redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE/DB")

    @model_validator(mode="after")
    def _upstream_defaults(self) -> ProxyConfig:
        """The default provider's upstream is always there; an upstream without a base_url
        gets its provider's."""
        ups = self.upstreams
        ups.setdefault(DEFAULT, UpstreamConfig())
        for name, up in ups.items():
            if "base_url" not in up.model_fields_set:
                ups[name] = up.model_copy(update={"base_url": PROVIDERS[name].default_base_url})
        return self


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config plus where it came from (relative paths resolve against it)."""

    proxy: ProxyConfig
    path: Path | None

    def resolve(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() or self.path is None else self.path.parent / p


def _read_secret_file(path: str) -> str:
    """A `${VAR}_FILE` secret's content: bytes as UTF-8, newlines kept as written."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def _env_value(name: str, default: str | None, env: dict[str, str], path: str, problems: list[tuple[str, str]],
               read_file: Callable[[str], str]) -> str:
    """`${NAME}` / `${NAME:-default}`: NAME, else the file named by NAME_FILE (Docker/Kubernetes secrets,
    in place of the default too), else the default. Problems name the variable, never a value."""
    value, file = env.get(name, ""), env.get(f"{name}_FILE", "")
    if value and file:
        problems.append((path, f"both {name} and {name}_FILE are set; set only one"))
        return ""
    if file:
        try:
            text = read_file(file)
        except UnicodeDecodeError:
            problems.append((path, f"the file named by {name}_FILE is not UTF-8 text"))
            return ""
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            problems.append((path, f"cannot read the file named by {name}_FILE ({file}): {reason}"))
            return ""
        for newline in ("\r\n", "\n"):  # one trailing newline, as `echo` or an editor leaves it
            if text.endswith(newline):
                return text[:-len(newline)]
        return text
    if default is not None:
        return value or default  # as in the shell: unset or empty takes the default
    if name in env:
        return env[name]
    problems.append((path, f"environment variable {name} is not set and has no default"))
    return ""


def expand_env(node: Any, env: dict[str, str], path: str, problems: list[tuple[str, str]],
               read_file: Callable[[str], str] = _read_secret_file) -> Any:
    """Every `${NAME}` / `${NAME:-default}` in the string values of `node` (docs/configuration.md)."""
    if isinstance(node, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k), problems, read_file)
                for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, env, f"{path}.{i}" if path else str(i), problems, read_file)
                for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    return _VAR.sub(lambda m: _env_value(m.group(1), m.group(2), env, path, problems, read_file), node)


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_input=False, include_url=False):
        loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-", "constrained-"))]
        msg = e["msg"].removeprefix("Value error, ")
        problems.append((".".join(loc), msg))
    return problems


def _raw_digest(key: Any) -> str | None:
    if not isinstance(key, dict):
        return None
    secret, digest = key.get("key"), key.get("key_sha256")
    if isinstance(secret, str) and secret:
        return key_digest(secret)
    if isinstance(digest, str) and _SHA256.match(digest):
        return digest
    return None


def _duplicate_secrets(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Two entries with one secret, found on the raw (expanded) data so that they are listed
    together with every other problem."""
    seen: dict[str, str] = {}
    problems = []
    teams = data.get("teams")
    for team_name, team in (teams.items() if isinstance(teams, dict) else ()):
        keys = team.get("keys") if isinstance(team, dict) else None
        for key_name, key in (keys.items() if isinstance(keys, dict) else ()):
            digest = _raw_digest(key)
            if digest is None:
                continue
            path = f"teams.{team_name}.keys.{key_name}"
            if digest in seen:
                problems.append((path, f"uses the same secret as {seen[digest]}"))
            else:
                seen[digest] = path
    admin = data.get("admin_key")
    if isinstance(admin, str) and admin and key_digest(admin) in seen:
        problems.append(("admin_key", f"uses the same secret as {seen[key_digest(admin)]}"))
    return problems


def parse_config(data: Any, env: dict[str, str] | None = None, path: Path | None = None) -> LoadedConfig:
    problems: list[tuple[str, str]] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("", "the config must be a YAML mapping")])
    data = expand_env(data, dict(os.environ) if env is None else env, "", problems)
    duplicates = _duplicate_secrets(data)
    try:
        cfg = ProxyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(problems + _pydantic_problems(err) + duplicates) from None
    problems += duplicates
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(cfg, path)


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> LoadedConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([("", f"cannot read {p}: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([("", f"not valid YAML{where}")]) from None
    return parse_config(data, env, p.resolve())
