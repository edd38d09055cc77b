"""The validated configuration model.

Names follow Swoole's where Swoole has one (`worker_num`, `max_connection`,
`heartbeat_check_interval`, `heartbeat_idle_time`, `buffer_output_size`), so that Swoole
users feel at home. Every model is frozen and forbids unknown keys: the master validates
once, before forking, and workers inherit the same object.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

EMBEDDED = "embedded"
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

Port = Annotated[int, Field(ge=1, le=65535)]
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 9501
    path: str = "/ws"
    metrics_path: str | None = "/metrics"
    worker_num: PositiveInt = Field(default_factory=_cpu_count)
    node_id: str | None = None
    backlog: PositiveInt = 2048
    max_connection: PositiveInt = 100_000
    heartbeat_check_interval: NonNegativeFloat = 25.0
    heartbeat_idle_time: PositiveFloat = 60.0
    buffer_output_size: PositiveInt = 2 * 1024 * 1024
    max_message_size: PositiveInt = 1024 * 1024
    websocket_compression: bool = False
    websocket_inflate_rate: PositiveInt = 4 * 1024 * 1024
    handshake_timeout: PositiveFloat = 10.0
    close_timeout: PositiveFloat = 3.0
    shutdown_timeout: PositiveFloat = 10.0
    worker_timeout: PositiveFloat = 30.0
    allowed_origins: tuple[str, ...] | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    reload_grace: NonNegativeFloat = 5.0
    max_request: NonNegativeInt = 0
    max_request_jitter: NonNegativeInt = 0
    pid_file: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    admin_host: str = "127.0.0.1"
    admin_port: Port | None = None
    demo_page: bool = False

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"{network!r} is not an IP address or network (e.g. 10.0.0.0/8, ::1)"
                ) from None
        return value

    @field_validator("path", "metrics_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith("/") or "?" in value or " " in value:
            raise ValueError("must start with '/' and hold no query or spaces")
        if value == "/healthz":
            raise ValueError("/healthz is the health endpoint; choose another path")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for origin in value or ():
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: scheme://host[:port], as browsers send "
                    "it (e.g. https://app.example.com), with no path"
                )
        return value

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str | None) -> str | None:
        if value is not None and not _NODE_ID.fullmatch(value):
            raise ValueError("must be 1-32 letters, digits, '_' or '-'")
        return value

    @field_validator("pid_file")
    @classmethod
    def _pid_file(cls, value: str | None) -> str | None:
        if value is not None and (not os.path.isabs(value) or value.endswith("/")):
            # The master and `shoal status` may run in different working directories.
            raise ValueError("must be an absolute file path, or null for the default")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError(
                "ssl_cert_file and ssl_key_file go together: give both to serve wss://, or neither"
            )
        if self.admin_port == self.port:
            raise ValueError(
                f"admin_port ({self.admin_port}) must differ from port: the admin listener "
                "answers plain HTTP only"
            )
        if self.demo_page and self.path == "/":
            raise ValueError(
                "demo_page serves the browser demo at '/': give path another value "
                "(e.g. /ws), or turn demo_page off"
            )
        if self.metrics_path == self.path:
            raise ValueError(
                f"metrics_path ({self.metrics_path}) must differ from path: the metrics "
                "page would hide the WebSocket endpoint"
            )
        interval = self.heartbeat_check_interval
        if interval and self.heartbeat_idle_time <= interval:
            raise ValueError(
                f"heartbeat_idle_time ({self.heartbeat_idle_time:g}) must be greater than "
                f"heartbeat_check_interval ({interval:g}): a client answering every ping "
                "would otherwise be closed as idle"
            )
        if self.buffer_output_size < self.max_message_size:
            raise ValueError(
                f"buffer_output_size ({self.buffer_output_size}) must be at least "
                f"max_message_size ({self.max_message_size}): one echoed message would "
                "otherwise cut a client off as a slow consumer"
            )
        if self.close_timeout >= self.shutdown_timeout:
            raise ValueError(
                f"close_timeout ({self.close_timeout:g}) must be less than "
                f"shutdown_timeout ({self.shutdown_timeout:g}): closing handshakes run "
                "inside the shutdown window"
            )
        return self


class RedisConfig(_Section):
    url: str = EMBEDDED
    prefix: str = "shoal"
    heartbeat_ttl: Annotated[float, Field(ge=2.0)] = 10.0
    server_bin: str = "redis-server"
    connect_timeout: PositiveFloat = 2.0
    stall_timeout: PositiveFloat = 1.0
    socket_timeout: PositiveFloat = 5.0
    health_check_interval: PositiveFloat = 3.0
    max_write_buffer: Annotated[int, Field(ge=64 * 1024)] = 32 * 1024 * 1024

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value != EMBEDDED and not value.startswith(_REDIS_SCHEMES):
            raise ValueError(
                "must be 'embedded' or a URL starting with redis://, rediss:// or unix://"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # A ':' in a prefix could make one deployment's keys a subset of another's
        # ("a" + ":room:x" == "a:room" + ":x"), so prefixes are plain words.
        if not _PREFIX.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-' (no ':')")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RedisConfig:
        if self.stall_timeout >= self.socket_timeout:
            raise ValueError(
                f"stall_timeout ({self.stall_timeout:g}) must be less than socket_timeout "
                f"({self.socket_timeout:g}): a stalled connection refuses new commands "
                "before it is given up"
            )
        if self.socket_timeout + self.health_check_interval >= self.heartbeat_ttl:
            raise ValueError(
                f"socket_timeout + health_check_interval ({self.socket_timeout:g} + "
                f"{self.health_check_interval:g}) must be less than heartbeat_ttl "
                f"({self.heartbeat_ttl:g}): a worker must notice a dead Redis connection "
                "and reconnect before other nodes sweep its state"
            )
        return self

    @property
    def embedded(self) -> bool:
        return self.url == EMBEDDED


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["text", "json"] = "text"
    connections: bool = True

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class HistoryRuleConfig(_Section):
    """Rooms matching `rooms` (shell-style: `orders.*`) keep about `size` messages, for
    `ttl` seconds after the last one."""

    rooms: Annotated[str, Field(min_length=1, max_length=256)]
    size: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    ttl: Annotated[float, Field(ge=1.0)] = 300.0


class AppConfig(BaseModel):
    """The application to serve, and its own settings.

    Keys other than `module` and `history` belong to the application: they are kept as
    given and reach it as `App.settings`. The built-in chat app reads
    `announce_connections`.
    """

    model_config = ConfigDict(frozen=True, extra="allow")
    module: str = "chat"
    history: tuple[HistoryRuleConfig, ...] = ()
    """Rooms that keep their last messages, for clients that come back (docs/delivery.md)."""

    @field_validator("module")
    @classmethod
    def _module(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?", value):
            raise ValueError(
                "must be 'package.module:attribute', 'package.module' or a built-in name"
            )
        return value

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SmtpConfig(_Section):
    """Where the built-in `send_email` task sends mail."""

    host: str = "localhost"
    port: Port = 25
    starttls: bool = False
    tls: bool = False
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    from_address: str = "shoal@localhost"
    timeout: PositiveFloat = 10.0

    @model_validator(mode="after")
    def _consistent(self) -> SmtpConfig:
        if self.starttls and self.tls:
            raise ValueError(
                "starttls and tls exclude each other: tls is SMTP over TLS "
                "from the first byte (port 465), starttls upgrades (port 587)"
            )
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both")
        if self.password_env is not None and self.password_env not in os.environ:
            raise ValueError(f"password_env: the environment has no {self.password_env}")
        return self

    def secret(self) -> str | None:
        """The password, from the config or from the environment variable it names."""
        if self.password_env is not None:
            return os.environ[self.password_env]
        return self.password


class TasksConfig(_Section):
    """The task pool (Swoole's task workers): slow jobs off the WebSocket workers."""

    task_worker_num: NonNegativeInt | None = None
    modules: tuple[str, ...] = ("shoal.tasks.builtin",)
    concurrency: PositiveInt = 16
    visibility_timeout: Annotated[float, Field(ge=1.0)] = 30.0
    timeout: PositiveFloat = 60.0
    max_retries: NonNegativeInt = 3
    retry_backoff: PositiveFloat = 1.0
    max_pending: PositiveInt = 10_000
    result_ttl: Annotated[float, Field(ge=1.0)] = 3600.0
    nice: Annotated[int, Field(ge=0, le=19)] = 10
    sched_idle: bool = True
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for module in value:
            if not _MODULE.fullmatch(module):
                raise ValueError(f"{module!r} is not a module import string (package.module)")
        return value


class LimitsConfig(_Section):
    """What one client may make the server keep or send on its behalf."""

    max_metadata_bytes: Annotated[int, Field(ge=2)] = 4096
    max_rooms: PositiveInt = 100
    max_channels: PositiveInt = 100
    # Per client address, counted in Redis across workers and nodes; 0: no limit.
    connections_per_ip: NonNegativeInt = 0
    connections_per_ip_per_minute: NonNegativeInt = 0
    # Per connection (`shoal.workers.ratelimit`); None lifts the limit.
    messages_per_second: PositiveFloat | None = 50.0
    burst: PositiveInt = 200
    bytes_per_second: PositiveInt | None = 1024 * 1024
    bytes_burst: PositiveInt = 1024 * 1024
    max_refused: PositiveInt = 20
    abuse_window: PositiveFloat = 10.0
    # Backpressure toward Redis (`shoal.core.bus`).
    publish_backlog: Annotated[int, Field(ge=64 * 1024)] = 1024 * 1024
    subscriber_backlog: Annotated[int, Field(ge=64 * 1024)] = 4 * 1024 * 1024


_ALGORITHMS = (
    *("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"),
    *("PS256", "PS384", "PS512", "EdDSA"),
)
_ROLE = re.compile(r"[\w.-]{1,64}")


class JwtConfig(_Section):
    """How tokens are verified: one of `secret`, `secret_env`, `public_key_file`,
    `jwks_url`."""

    secret: str | None = None
    secret_env: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    jwks_refresh: Annotated[float, Field(ge=10.0)] = 300.0
    algorithms: tuple[str, ...] = ("HS256",)
    audience: str | None = None
    issuer: str | None = None
    leeway: NonNegativeFloat = 0.0

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one algorithm")
        for algorithm in value:
            if algorithm not in _ALGORITHMS:
                raise ValueError(f"{algorithm!r} is not one of {', '.join(_ALGORITHMS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JwtConfig:
        given = [
            name
            for name in ("secret", "secret_env", "public_key_file", "jwks_url")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of secret, secret_env, public_key_file, jwks_url"
                + (f" (found {', '.join(given)})" if given else "")
            )
        symmetric = {a for a in self.algorithms if a.startswith("HS")}
        if (self.secret is not None or self.secret_env is not None) != bool(symmetric):
            raise ValueError(
                "algorithms: a secret verifies HS256/HS384/HS512 only, and a public key "
                "or JWKS the others: mixing them would let a public key sign tokens"
            )
        if symmetric and len(symmetric) != len(self.algorithms):
            raise ValueError("algorithms: do not mix HS* with public-key algorithms")
        if self.secret_env is not None and not os.environ.get(self.secret_env):
            raise ValueError(f"secret_env: the environment has no {self.secret_env}")
        if self.secret is not None and len(self.secret) < 32:
            raise ValueError("secret: use at least 32 characters (RFC 7518 asks for 256 bits)")
        if self.public_key_file is not None and not os.path.isfile(
            os.path.expanduser(self.public_key_file)
        ):
            raise ValueError(f"public_key_file: no such file: {self.public_key_file}")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("jwks_url: must be an http(s) URL")
        return self

    def secret_value(self) -> str | None:
        """The HMAC secret, from the config or the environment variable it names."""
        if self.secret_env is not None:
            return os.environ[self.secret_env]
        return self.secret


class RoomRuleConfig(_Section):
    pattern: Annotated[str, Field(min_length=1, max_length=256)]
    roles: tuple[str, ...]


class AuthConfig(_Section):
    """Identity at the handshake, roles and room rules (docs/security.md)."""

    jwt: JwtConfig | None = None
    required: bool = True
    roles: dict[str, tuple[str, ...]] | None = None
    rooms: tuple[RoomRuleConfig, ...] = ()
    presence_all: tuple[str, ...] | None = ("admin",)

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: dict[str, tuple[str, ...]] | None) -> dict[str, tuple[str, ...]] | None:
        for role in value or {}:
            if not _ROLE.fullmatch(role):
                raise ValueError(f"{role!r} is not a role name (1-64 letters, digits, _ . -)")
        return value

    @property
    def enabled(self) -> bool:
        """Whether tokens are verified (`auth.jwt` is set)."""
        return self.jwt is not None


_APP_ID = re.compile(r"[0-9]{1,20}")
_APP_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


WEBHOOK_EVENTS = (
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
)
WebhookEvent = Literal[
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
]


class WebhookConfig(_Section):
    """Where a Pusher app's webhooks go, and which events (all by default)."""

    url: str
    event_types: tuple[WebhookEvent, ...] = WEBHOOK_EVENTS  # type: ignore[assignment]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("a webhook url is http:// or https://")
        return value


class PusherAppConfig(_Section):
    """One application of the Pusher-compatible endpoint (docs/pusher.md).

    `id` is what the server libraries put in `/apps/{id}/...`, `key` what clients put in
    `/app/{key}`, and the secret signs both ends' requests: give it as `secret` or name
    the environment variable that holds it (`secret_env`).
    """

    id: str
    key: str
    secret: str | None = None
    secret_env: str | None = None
    enabled: bool = True
    max_connections: PositiveInt | None = None
    client_events: Literal["off", "members"] = "members"
    client_events_per_second: PositiveInt = 10
    max_event_bytes: PositiveInt = 10 * 1024
    max_presence_members: PositiveInt = 100
    max_presence_member_bytes: PositiveInt = 2 * 1024
    allowed_origins: tuple[str, ...] | None = None
    activity_timeout: Annotated[int, Field(ge=5, le=3600)] = 30
    webhooks: tuple[WebhookConfig, ...] = ()

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _APP_ID.fullmatch(value):
            raise ValueError("an app id is 1-20 digits (the server libraries require digits)")
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _APP_KEY.fullmatch(value):
            raise ValueError("an app key is 1-64 letters, digits, _ or -")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for origin in value or ():
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        return value

    @model_validator(mode="after")
    def _secret(self) -> PusherAppConfig:
        if (self.secret is None) == (self.secret_env is None):
            raise ValueError("give exactly one of secret, secret_env")
        if self.secret_env is not None and not os.environ.get(self.secret_env):
            raise ValueError(f"secret_env: the environment has no {self.secret_env}")
        if len(self.secret_value()) < 16:
            raise ValueError("secret: use at least 16 characters")
        return self

    def secret_value(self) -> str:
        """The app's secret, from the config or the environment variable it names."""
        if self.secret_env is not None:
            return os.environ.get(self.secret_env, "")
        return self.secret or ""


class PusherConfig(_Section):
    """The Pusher-compatible endpoint: `/app/{key}` for clients, `/apps/{id}/...` for the
    HTTP API, on the WebSocket port. Off while `apps` is empty."""

    apps: tuple[PusherAppConfig, ...] = ()

    @field_validator("apps")
    @classmethod
    def _unique(cls, value: tuple[PusherAppConfig, ...]) -> tuple[PusherAppConfig, ...]:
        for attribute in ("id", "key"):
            seen: set[str] = set()
            for app in value:
                name = getattr(app, attribute)
                if name in seen:
                    raise ValueError(f"two apps have the {attribute} {name!r}")
                seen.add(name)
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.apps)


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    app: AppConfig = Field(default_factory=AppConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    pusher: PusherConfig = Field(default_factory=PusherConfig)

    @model_validator(mode="after")
    def _limits(self) -> Config:
        limits, size = self.limits, self.server.max_message_size
        if limits.bytes_per_second is not None and limits.bytes_burst < size:
            raise ValueError(
                f"limits.bytes_burst ({limits.bytes_burst}) must be at least "
                f"server.max_message_size ({size}): a message that big could never pass "
                "the byte rate limit"
            )
        if limits.publish_backlog > self.redis.max_write_buffer:
            raise ValueError(
                f"limits.publish_backlog ({limits.publish_backlog}) must be at most "
                f"redis.max_write_buffer ({self.redis.max_write_buffer}): publishers "
                "must wait before publishes are refused"
            )
        return self

    @property
    def task_processes(self) -> int:
        """`tasks.task_worker_num`; unset, 2 for the built-in chat app (its `task`
        messages need a pool) or when a Pusher app has webhooks (the pool delivers
        them), and 0, no pool, otherwise."""
        if self.tasks.task_worker_num is not None:
            return self.tasks.task_worker_num
        webhooks = any(app.webhooks for app in self.pusher.apps)
        return 2 if self.app.module == "chat" or webhooks else 0
