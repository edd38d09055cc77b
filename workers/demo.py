"""The browser demo page (`server.demo_page`): a chat client served at `/` on the
WebSocket port, for a person to try shoal with (docs/client.md#browser-demo).

The page is one file, `demo.html` beside this module, with its script and style inline
and no dependency. A worker reads it once, when it starts, and fills in what the page must
know: the WebSocket path, whether tokens are checked, and what each close code advises
(`shoal.core.schema`, the table the server closes connections by). Its
Content-Security-Policy allows the page's one `<script>` and one `<style>` element by
their SHA-256 hashes and nothing else: no other script runs, even one injected through a
bug, and the page connects only to its own origin (`'self'`, which covers `ws:` and
`wss:` to the same host in browsers that follow CSP Level 3, every current one).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import orjson

from shoal.config.model import AuthConfig, ServerConfig
from shoal.core import schema
from shoal.core.errors import BootError

PATH = "/"
CONTENT_TYPE = "text/html; charset=utf-8"
_FILE = "demo.html"
_SETTINGS = "{{settings}}"
# The elements the policy allows, attribute-free; the settings' data block, which never
# runs, has attributes and so is not one of them.
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)
# Hosts that mean "every interface": a browser reaches them as the loopback address.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class Page:
    """The demo page as a worker answers it: the body, and its headers besides
    `Content-Type` (`CONTENT_TYPE`) and `Content-Length`."""

    body: bytes
    headers: tuple[tuple[str, str], ...]


def load(server: ServerConfig, auth: AuthConfig) -> Page:
    """Read the page shipped with shoal and fill it in for this configuration.

    Raises:
        BootError: the file is missing or malformed (a broken installation).
    """
    try:
        text = resources.files("shoal.workers").joinpath(_FILE).read_text(encoding="utf-8")
    except OSError as exc:
        raise BootError(f"server.demo_page: cannot read the page {_FILE}: {exc}") from exc
    return render(text, server, auth)


def render(text: str, server: ServerConfig, auth: AuthConfig) -> Page:
    """The page whose source is `text`, filled in for this configuration.

    Raises:
        BootError: `text` lacks the place for the settings, or exactly one attribute-free
            `<script>` and one `<style>` element.
    """
    scripts, styles = _SCRIPT.findall(text), _STYLE.findall(text)
    if len(scripts) != 1 or len(styles) != 1 or text.count(_SETTINGS) != 1:
        raise BootError(
            f"server.demo_page: {_FILE} must hold one <script>, one <style> and one "
            f"{_SETTINGS}; found {len(scripts)}, {len(styles)} and {text.count(_SETTINGS)}"
        )
    settings = {
        "path": server.path,
        "auth": auth.enabled,
        "reconnect": {str(int(code)): advice.reconnect.value
                      for code, advice in schema.ADVICE.items()},
    }  # fmt: skip
    # JSON inside a <script> element ends at the first "</": escaped, no value can end it.
    data = orjson.dumps(settings).decode().replace("<", "\\u003c")
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_hash(scripts[0])}",
            f"style-src {_hash(styles[0])}",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return Page(
        text.replace(_SETTINGS, data).encode(),
        (
            # The page holds the configuration it was served with: no cache may keep it
            # past a reload or an upgrade.
            ("Cache-Control", "no-store"),
            ("Content-Security-Policy", policy),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ),
    )


def url(server: ServerConfig) -> str:
    """Where a browser on this host opens the page, e.g. `http://127.0.0.1:9501/`."""
    host = _WILDCARDS.get(server.host, server.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    scheme = "https" if server.ssl_cert_file is not None else "http"
    return f"{scheme}://{host}:{server.port}{PATH}"


def _hash(source: str) -> str:
    """A CSP source expression allowing the inline element whose text is `source`."""
    digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
    return f"'sha256-{digest}'"
