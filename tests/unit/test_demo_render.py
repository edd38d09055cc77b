"""The demo page as a worker fills it in: settings that cannot break out of their block,
a page that lacks its parts refused, and the address the log gives."""

from __future__ import annotations

import json
import re

import pytest

from shoal.config.model import AuthConfig, JwtConfig, ServerConfig
from shoal.core.errors import BootError
from shoal.workers import demo

PAGE = '<style>p{}</style><script type="application/json" id="s">{{settings}}</script>' + (
    "<script>go()</script>"
)


def settings_of(page: demo.Page) -> dict[str, object]:
    (block,) = re.findall(r'id="s">(.*?)</script>', page.body.decode())
    result: dict[str, object] = json.loads(block)
    return result


def test_settings_cannot_end_their_script_element() -> None:
    """A path may hold `<` (the config allows it): escaped, it cannot close the data block
    and open a script of its own."""
    path = "/x</script><script>alert(1)</script>"
    page = demo.render(PAGE, ServerConfig(path=path), AuthConfig())
    assert "alert(1)</script>" not in page.body.decode()
    assert settings_of(page)["path"] == path


def test_settings_say_whether_tokens_are_checked() -> None:
    assert settings_of(demo.render(PAGE, ServerConfig(), AuthConfig()))["auth"] is False
    auth = AuthConfig(jwt=JwtConfig(secret="s" * 32))
    assert settings_of(demo.render(PAGE, ServerConfig(), auth))["auth"] is True


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (PAGE.replace("<style>p{}</style>", ""), "found 1, 0 and 1"),
        (PAGE + "<script>more()</script>", "found 2, 1 and 1"),
        (PAGE.replace("{{settings}}", ""), "found 1, 1 and 0"),
    ],
)
def test_a_page_without_its_parts_is_refused(text: str, found: str) -> None:
    """The policy would otherwise allow one element and block another, silently."""
    with pytest.raises(BootError, match=f"must hold one <script>, one <style>.*; {found}"):
        demo.render(text, ServerConfig(), AuthConfig())


@pytest.mark.parametrize(
    ("server", "url"),
    [
        (ServerConfig(), "http://127.0.0.1:9501/"),
        (ServerConfig(host="0.0.0.0", port=80), "http://127.0.0.1:80/"),
        (ServerConfig(host="::"), "http://[::1]:9501/"),
        (ServerConfig(host="fd00::5"), "http://[fd00::5]:9501/"),
        (ServerConfig(host="chat.example.com"), "http://chat.example.com:9501/"),
        (
            ServerConfig(host="chat.example.com", ssl_cert_file="/c.pem", ssl_key_file="/k.pem"),
            "https://chat.example.com:9501/",
        ),
    ],
)
def test_the_logged_address(server: ServerConfig, url: str) -> None:
    assert demo.url(server) == url


def test_the_shipped_page_loads() -> None:
    """The file ships with the package and has its parts (tests/e2e/test_demo_page.py
    checks the whole answer)."""
    page = demo.load(ServerConfig(demo_page=True), AuthConfig())
    assert page.body.startswith(b"<!doctype html>")
