"""Load the configuration: YAML file, then environment, then CLI flags, then validate.

Precedence, lowest first: defaults, the YAML file, `SHOAL_<SECTION>__<KEY>` environment
variables, CLI overrides. Everything merges before validation, never after, so a
contradiction between sources is caught like any other.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shoal.config.model import Config
from shoal.core.errors import ConfigError

ENV_PREFIX = "SHOAL_"


def load(
    path: Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read YAML, merge environment and CLI overrides, validate.

    Args:
        path: YAML file; None uses the defaults alone.
        overrides: `{section: {key: value}}` from CLI flags; None values are ignored.
        environ: environment to read `SHOAL_<SECTION>__<KEY>` from (default `os.environ`).

    Raises:
        ConfigError: naming the file, the key and the problem, one line per problem.
    """
    data = _read_yaml(path) if path is not None else {}
    origins: dict[tuple[str, str], str] = {}
    env = os.environ if environ is None else environ
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if not sep or not section or not key:
            raise ConfigError(f"{name}: expected SHOAL_<SECTION>__<KEY>, e.g. SHOAL_SERVER__PORT")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        data[section][key] = _parse_scalar(name, raw)
        origins[(section, key)] = name
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                data.setdefault(section, {})[key] = value
                origins[(section, key)] = "the command line"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, origins)) from exc


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _parse_scalar(name: str, raw: str) -> Any:
    """Environment values are YAML scalars, so `8`, `true` and `1.5` get their types."""
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: cannot parse value {raw!r}: {exc}") from exc


def _describe(
    exc: ValidationError, path: Path | None, origins: Mapping[tuple[str, str], str]
) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join(loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        origin = origins.get((loc[0], loc[1])) if len(loc) >= 2 else None
        where = f" (from {origin})" if origin else (f" (in {path})" if path else "")
        lines.append(f"{key}: {message}{where}")
    return "\n".join(lines)


HIDDEN = "***"


def dump(config: Config) -> str:
    """The resolved configuration as YAML, every key included, secrets hidden: the
    password in `redis.url`, `tasks.smtp.password`, `auth.jwt.secret` and each
    `pusher.apps[].secret` read `***` (the output of `shoal check-config` ends up in
    terminals, tickets and CI logs)."""
    data = config.model_dump(mode="json")
    data["redis"]["url"] = _without_password(data["redis"]["url"])
    smtp = data["tasks"]["smtp"]
    if smtp["password"] is not None:
        smtp["password"] = HIDDEN
    jwt = data["auth"]["jwt"]
    if jwt is not None and jwt["secret"] is not None:
        jwt["secret"] = HIDDEN
    for app in data["pusher"]["apps"]:
        if app["secret"] is not None:
            app["secret"] = HIDDEN
    return yaml.safe_dump(data, sort_keys=False)


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{HIDDEN}@{host}").geturl()
