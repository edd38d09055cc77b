from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.config.loader import dump, load
from shoal.core.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shoal.yaml"
    path.write_text(text)
    return path


def test_defaults_work_out_of_the_box() -> None:
    """No file, no environment: a complete config with the documented defaults."""
    config = load(environ={})
    assert config.server.port == 9501 and config.server.path == "/ws"
    assert config.redis.embedded and config.redis.prefix == "shoal"
    assert config.app.module == "chat" and config.app.settings == {}


def test_default_worker_num_counts_the_cpus_this_process_may_use() -> None:
    """One worker per CPU of the process's affinity, not of the machine: pinned to one
    CPU (as `taskset -c 0` or a container's cpuset would), the default is one worker."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        assert load(environ={}).server.worker_num == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    """CLI flags beat the environment, which beats the file, which beats the defaults."""
    path = write(tmp_path, "server:\n  port: 1000\n  worker_num: 3\n  host: 0.0.0.0\n")
    env = {"SHOAL_SERVER__PORT": "2000", "SHOAL_SERVER__WORKER_NUM": "5", "HOME": "/x"}
    config = load(path, {"server": {"port": 3000, "worker_num": None}}, environ=env)
    assert config.server.port == 3000  # CLI wins
    assert config.server.worker_num == 5  # env beats file; a None flag is no override
    assert config.server.host == "0.0.0.0"  # file beats default


def test_app_settings_are_kept_for_the_application(tmp_path: Path) -> None:
    """Keys of `app` other than `module` reach the application as given (env values typed)."""
    path = write(tmp_path, "app:\n  module: mypkg.chat:app\n  announce_connections: true\n")
    config = load(path, environ={"SHOAL_APP__ROOM_LIMIT": "50"})
    assert config.app.module == "mypkg.chat:app"
    assert config.app.settings == {"announce_connections": True, "room_limit": 50}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  port: high\n", "server.port: Input should be a valid integer"),
        ("server:\n  port: 70000\n", "server.port: Input should be less than or equal to 65535"),
        ("server:\n  wokrer_num: 2\n", "server.wokrer_num: unknown key"),
        ("servr:\n  port: 1\n", "servr: unknown key"),
        ("server:\n  path: ws\n", "server.path: must start with '/'"),
        ("server:\n  path: /healthz\n", "server.path: /healthz is the health endpoint"),
        ("server:\n  pid_file: run/shoal.pid\n", "server.pid_file: must be an absolute file path"),
        ("server:\n  admin_port: 9501\n", "admin_port (9501) must differ from port"),
        (
            "server:\n  demo_page: true\n  path: /\n",
            "demo_page serves the browser demo at '/': give path another value",
        ),
        (
            "server:\n  trusted_proxies: [10.0.0.0/33]\n",
            "server.trusted_proxies: '10.0.0.0/33' is not an IP address or network",
        ),
        ("limits:\n  connections_per_ip: -1\n", "limits.connections_per_ip: Input should be"),
        ("redis:\n  url: http://x\n", "redis.url: must be 'embedded' or a URL"),
        ("redis:\n  prefix: 'a:b'\n", "redis.prefix: must be 1-64 letters"),
        ("log:\n  format: xml\n", "log.format: Input should be 'text' or 'json'"),
        (
            "server:\n  heartbeat_check_interval: 30\n  heartbeat_idle_time: 20\n",
            "heartbeat_idle_time (20) must be greater than heartbeat_check_interval (30)",
        ),
        (
            "server:\n  buffer_output_size: 1000\n",
            "buffer_output_size (1000) must be at least max_message_size",
        ),
        ("server:\n  close_timeout: 20\n", "close_timeout (20) must be less than shutdown_timeout"),
        (
            "tasks:\n  modules: [my-tasks]\n",
            "tasks.modules: 'my-tasks' is not a module import string",
        ),
        ("tasks:\n  nice: 20\n", "tasks.nice: Input should be less than or equal to 19"),
        (
            "tasks:\n  smtp:\n    tls: true\n    starttls: true\n",
            "tasks.smtp: starttls and tls exclude each other",
        ),
        (
            "tasks:\n  smtp:\n    password_env: SHOAL_TEST_NO_SUCH_VARIABLE\n",
            "password_env: the environment has no SHOAL_TEST_NO_SUCH_VARIABLE",
        ),
        ("auth:\n  jwt: {}\n", "auth.jwt: give exactly one of secret, secret_env"),
        ("auth:\n  jwt: {secret: short}\n", "auth.jwt: secret: use at least 32 characters"),
        (
            "auth:\n  jwt: {secret: " + "s" * 32 + ", algorithms: [RS256]}\n",
            "a secret verifies HS256/HS384/HS512 only",
        ),
        (
            "auth:\n  jwt: {jwks_url: 'https://idp/jwks', secret_env: X}\n",
            "found secret_env, jwks_url",
        ),
        ("auth:\n  jwt: {jwks_url: 'x', algorithms: [none]}\n", "'none' is not one of HS256"),
        (
            "auth:\n  jwt: {public_key_file: /nonexistent.pem, algorithms: [RS256]}\n",
            "public_key_file: no such file",
        ),
        ("auth:\n  roles: {'bad role': [x]}\n", "auth.roles: 'bad role' is not a role name"),
        ("- a list\n", "the top level must be a mapping"),
        ("server: [\n", "invalid YAML"),
    ],
)
def test_errors_name_the_key_and_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    """Each invalid config names the key and what is wrong with it."""
    with pytest.raises(ConfigError) as error:
        load(write(tmp_path, text), environ={})
    assert expected in str(error.value)


def test_env_errors_name_the_variable() -> None:
    """A bad value from the environment names the variable it came from."""
    with pytest.raises(
        ConfigError, match=r"server.worker_num: .* \(from SHOAL_SERVER__WORKER_NUM\)"
    ):
        load(environ={"SHOAL_SERVER__WORKER_NUM": "-1"})
    with pytest.raises(ConfigError, match="SHOAL_PORT: expected SHOAL_<SECTION>__<KEY>"):
        load(environ={"SHOAL_PORT": "1"})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """A config file that cannot be read is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.yaml", environ={})


def test_shipped_example_is_valid_and_complete() -> None:
    """config/shoal.yaml loads, and mentions every key of the model."""
    example = Path(__file__).parents[2] / "config" / "shoal.yaml"
    config = load(example, environ={})
    # Every key of the model appears in the example, so the example documents them all.
    text = example.read_text()
    for section, values in config.model_dump().items():
        for key in values:
            assert f"{key}:" in text, f"config/shoal.yaml lacks {section}.{key}"


def test_dump_round_trips(tmp_path: Path) -> None:
    """What check-config prints loads back to the same config."""
    config = load(environ={"SHOAL_SERVER__PORT": "1234"})
    assert load(write(tmp_path, dump(config)), environ={}) == config


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:sekret@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("rediss://bob:sekret@cache.internal:6380/2", "rediss://bob:***@cache.internal:6380/2"),
        ("redis://10.0.0.1:6379/0", "redis://10.0.0.1:6379/0"),
        ("embedded", "embedded"),
    ],
)
def test_dump_hides_passwords(tmp_path: Path, url: str, shown: str) -> None:
    """`shoal check-config` output lands in terminals and tickets: no secret in it."""
    path = write(
        tmp_path,
        f"redis: {{url: '{url}'}}\ntasks: {{smtp: {{password: hunter2}}}}\n"
        "auth: {jwt: {secret: the-jwt-secret-of-at-least-32-chars}}\n"
        "pusher: {apps: [{id: '1', key: k, secret: the-pusher-app-secret}]}\n",
    )
    text = dump(load(path, environ={}))
    assert f"url: {shown}\n" in text
    assert "sekret" not in text and "hunter2" not in text
    assert "the-jwt-secret" not in text and "the-pusher-app-secret" not in text


def test_allowed_origins_must_be_origins(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {allowed_origins: ['https://app.example.com/chat']}\n")
    with pytest.raises(ConfigError, match=r"server.allowed_origins.*not an origin"):
        load(path, environ={})
    ok = write(tmp_path, "server: {allowed_origins: ['https://app.example.com:8443']}\n")
    assert load(ok, environ={}).server.allowed_origins == ("https://app.example.com:8443",)


def test_a_byte_burst_below_the_largest_message_is_refused(tmp_path: Path) -> None:
    """A message of `server.max_message_size` could never pass a smaller byte burst."""
    path = write(tmp_path, "server: {max_message_size: 2097152}\n")
    with pytest.raises(ConfigError, match=r"limits.bytes_burst \(1048576\) must be at least"):
        load(path, environ={})
    lifted = write(
        tmp_path, "server: {max_message_size: 2097152}\nlimits: {bytes_per_second: null}\n"
    )
    assert load(lifted, environ={}).limits.bytes_per_second is None


@pytest.mark.parametrize(
    ("apps", "error"),
    [
        ("[{id: app1, key: k, secret: 0123456789abcdef}]", r"pusher.apps.0.id.*digits"),
        ("[{id: '1', key: 'k k', secret: 0123456789abcdef}]", r"pusher.apps.0.key"),
        ("[{id: '1', key: k}]", r"pusher.apps.0.*exactly one of secret, secret_env"),
        ("[{id: '1', key: k, secret: short}]", r"pusher.apps.0.*at least 16"),
        ("[{id: '1', key: k, secret_env: NOT_SET_ANYWHERE}]", r"environment has no NOT_SET"),
        (
            "[{id: '1', key: a, secret: 0123456789abcdef}, {id: '1', key: b, "
            "secret: 0123456789abcdef}]",
            r"pusher.apps.*two apps have the id '1'",
        ),
        (
            "[{id: '1', key: k, secret: 0123456789abcdef, webhooks: [{url: ftp://x}]}]",
            r"pusher.apps.0.webhooks.0.url.*http",
        ),
        (
            "[{id: '1', key: k, secret: 0123456789abcdef, "
            "webhooks: [{url: 'http://x', event_types: [nope]}]}]",
            r"pusher.apps.0.webhooks.0.event_types",
        ),
    ],
)
def test_pusher_apps_are_checked(tmp_path: Path, apps: str, error: str) -> None:
    path = write(tmp_path, f"pusher: {{apps: {apps}}}\n")
    with pytest.raises(ConfigError, match=error):
        load(path, environ={})


def test_pusher_webhooks_give_a_task_pool_by_default(tmp_path: Path) -> None:
    hooks = "webhooks: [{url: 'https://app.test/hooks'}]"
    path = write(tmp_path, f"app: {{module: echo}}\npusher: {{apps: [{{id: '1', key: k, "
                           f"secret: 0123456789abcdef, {hooks}}}]}}\n")  # fmt: skip
    assert load(path, environ={}).task_processes == 2
    plain = write(tmp_path, "app: {module: echo}\n")
    assert load(plain, environ={}).task_processes == 0


def test_history_rules_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, "app: {history: [{rooms: 'orders.*', size: 0}]}\n")
    with pytest.raises(ConfigError, match=r"app.history.0.size"):
        load(path, environ={})
    path = write(tmp_path, "app: {history: [{size: 10}]}\n")
    with pytest.raises(ConfigError, match=r"app.history.0.rooms"):
        load(path, environ={})
    ok = write(tmp_path, "app: {history: [{rooms: 'orders.*'}], announce: true}\n")
    config = load(ok, environ={})
    assert config.app.history[0].size == 1000 and config.app.history[0].ttl == 300
    assert config.app.settings == {"announce": True}  # history is shoal's, not the app's
