"""The `shoal` command: `serve`, `tasks`, `reload`, `stop`, `status`, `check-config`,
`connect` (the terminal client, `shoal.client.terminal`), `--version`."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from shoal.client import terminal
from shoal.config import loader
from shoal.config.model import Config
from shoal.core import app, logs
from shoal.core import task as task_api
from shoal.core.errors import BootError, ConfigError, ShoalError
from shoal.server import control, pidfile
from shoal.server.master import Master
from shoal.workers import tls

EXIT_CONFIG = 2
CONTROL_COMMANDS = ("reload", "stop", "status")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="A multi-process WebSocket server with Redis-shared state.",
    )
    parser.add_argument("--version", action="version", version=f"shoal {version('shoal')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start the master and its workers")
    serve.add_argument("--config", "-c", type=Path, help="YAML config file (default: none)")
    serve.add_argument("--host", help="server.host")
    serve.add_argument("--port", type=int, help="server.port")
    serve.add_argument("--worker-num", type=int, help="server.worker_num")
    serve.add_argument("--redis-url", help="redis.url ('embedded' or redis://...)")
    serve.add_argument("--app", help="app.module ('chat', 'echo' or 'package.module:app')")
    serve.add_argument("--log-level", help="log.level")

    tasks = commands.add_parser(
        "tasks",
        help="run a task pool alone, no WebSocket listener, on the Redis of a shoal node",
    )
    tasks.add_argument("--config", "-c", type=Path, help="YAML config file (default: none)")
    tasks.add_argument("--task-worker-num", type=int, help="tasks.task_worker_num")
    tasks.add_argument("--redis-url", help="redis.url (redis://...; not 'embedded')")
    tasks.add_argument("--log-level", help="log.level")

    reload = commands.add_parser(
        "reload",
        help="reload the running master's workers (SIGHUP) and wait for the outcome",
    )
    _master_options(reload)
    reload.add_argument(
        "--timeout", type=_seconds, default=60.0, help="seconds to wait (default: 60)"
    )

    stop = commands.add_parser(
        "stop", help="stop the running master (SIGTERM) and wait until it is gone"
    )
    _master_options(stop)
    stop.add_argument(
        "--timeout", type=_seconds, default=60.0, help="seconds to wait (default: 60)"
    )
    stop.add_argument(
        "--now", action="store_true", help="stop at once (SIGQUIT), without a graceful close"
    )

    show = commands.add_parser("status", help="print the running master's status")
    _master_options(show)
    show.add_argument("--json", action="store_true", help="print the status as JSON")

    check = commands.add_parser(
        "check-config", help="validate a config file and print the resolved configuration"
    )
    check.add_argument("path", type=Path)

    connect = commands.add_parser(
        "connect",
        help="an interactive WebSocket client, like wscat: type lines, see what comes back",
        description="Type lines to send them, see what the server sends; /help lists the "
        "commands. The same as shoal-connect.",
    )
    terminal.add_arguments(connect)
    return parser


def _master_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config",
        "-c",
        type=Path,
        help="the master's YAML config file, to find its server.pid_file or server.port",
    )
    command.add_argument("--pid-file", type=Path, help="the master's pid file (overrides --config)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text}")
    return value


def _control(args: argparse.Namespace) -> int:
    """Run `reload`, `stop` or `status` against the master the pid file names.

    Only `server.pid_file` and `server.port` matter here, so the config file is loaded
    without the checks `serve` makes (application module, task modules).
    """
    try:
        path: Path = args.pid_file or pidfile.resolve(loader.load(args.config).server)
    except ConfigError as exc:
        sys.stderr.write(f"shoal: invalid configuration:\n{exc}\n")
        return EXIT_CONFIG
    out, err = sys.stdout, sys.stderr
    try:
        if args.command == "reload":
            return control.reload(path, args.timeout, out, err)
        if args.command == "stop":
            return control.stop(path, args.timeout, out, err, now=args.now)
        return control.show(path, out, err, as_json=args.json)
    except ShoalError as exc:
        err.write(f"shoal: {exc}\n")
        return control.EXIT_FAILED


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if args.command == "tasks":
        return {
            "tasks": {"task_worker_num": args.task_worker_num},
            "redis": {"url": args.redis_url},
            "log": {"level": args.log_level},
        }
    return {
        "server": {"host": args.host, "port": args.port, "worker_num": args.worker_num},
        "redis": {"url": args.redis_url},
        "app": {"module": args.app},
        "log": {"level": args.log_level},
    }


def _load(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    config = loader.load(path, overrides)
    app.check(config.app.module)
    tls.context(config.server)  # the files exist, and the key matches the certificate
    try:
        # Imported here, before any fork: every child inherits them, and a module that
        # cannot be imported is a configuration error, not a crash loop.
        task_api.load(config.tasks.modules)
    except BootError as exc:
        raise ConfigError(str(exc)) from exc
    return config


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "connect":
        return terminal.run(args, "shoal connect")
    if args.command in CONTROL_COMMANDS:
        return _control(args)
    try:
        if args.command == "check-config":
            config = _load(args.path)
            sys.stdout.write(loader.dump(config))
            return 0
        config = _load(args.config, _overrides(args))
        if args.command == "tasks" and config.redis.embedded:
            raise ConfigError(
                "redis.url: a task pool alone must use the Redis of the shoal nodes it "
                "serves (redis://...), not 'embedded'"
            )
    except ConfigError as exc:
        sys.stderr.write(f"shoal: invalid configuration:\n{exc}\n")
        return EXIT_CONFIG
    logs.setup(config.log.level, config.log.format)
    try:
        return Master(
            config,
            tasks_only=args.command == "tasks",
            reread=lambda: _load(args.config, _overrides(args)),
        ).run()
    except ShoalError as exc:
        logging.getLogger("shoal").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
