"""The browser demo page (`server.demo_page`): its plain HTTP answer, and the page itself
driven in headless Chromium against a live two-worker node, through a full restart.

The browser is Debian's `chromium` (`./dev test` installs it), driven by Playwright; no
browser of Playwright's own download is used. Screenshots land in `$SHOALTEST_ARTIFACTS`,
by default `tests/artifacts/` (ignored by git): `demo-page.png`, the conversation after the
restart, and `last-<test>-<page>.png`, each page as a browser test left it (what a failure
looked like).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    expect,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

from shoal.client import Client

from support import SCALE, Shoal, upgrade_request

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("SHOALTEST_ARTIFACTS", Path(__file__).parents[1] / "artifacts"))
SECRET = "a-demo-page-test-secret-long-enough-for-hs256-0123456789"
# The page's own path: it must learn it from the server, not assume /ws.
WS_PATH = "/chat"


def ms(seconds: float) -> float:
    """A Playwright timeout (milliseconds), scaled as every timeout of the suite."""
    return seconds * SCALE * 1000


# Every wait on the pages, unless it says otherwise.
expect.set_options(timeout=ms(10))


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET `url`: the status, the headers and the body, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=5 * SCALE) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def status_line(port: int, request: bytes) -> bytes:
    """Send a raw request; the first line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5 * SCALE) as sock:
        sock.sendall(request)
        return sock.makefile("rb").readline().rstrip()


@pytest.fixture
def demo(tmp_path: Path, settings: dict[str, Any]) -> Iterator[Shoal]:
    """A two-worker node serving the demo page, with its WebSocket on `WS_PATH`."""
    node = Shoal(tmp_path, {**settings, "server": {"demo_page": True, "path": WS_PATH}})
    yield node.start()
    node.stop()


def test_the_page_answers_with_its_headers(demo: Shoal) -> None:
    status, headers, body = get(f"http://127.0.0.1:{demo.port}/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert int(headers["Content-Length"]) == len(body)
    # The policy allows the page's own script and style, by hash, and nothing else.
    policy = {}
    for directive in headers["Content-Security-Policy"].split(";"):
        name, sources = directive.strip().split(" ", 1)
        policy[name] = sources
    text = body.decode()
    (script,) = re.findall(r"<script>(.*?)</script>", text, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", text, re.DOTALL)
    assert policy == {
        "default-src": "'none'",
        "script-src": f"'sha256-{sha256(script)}'",
        "style-src": f"'sha256-{sha256(style)}'",
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    # The page learns the WebSocket path and the close codes' advice from the server.
    settings = json.loads(re.findall(r'<script [^>]*id="settings">(.*?)</script>', text)[0])
    assert settings["path"] == WS_PATH and settings["auth"] is False
    assert settings["reconnect"]["1012"] == "promptly"
    assert settings["reconnect"]["4003"] == "never"
    # Any query string; an upgrade at / is still refused, the WebSocket path still works.
    assert get(f"http://127.0.0.1:{demo.port}/?user=ann")[0] == 200
    assert status_line(demo.port, upgrade_request("/")) == b"HTTP/1.1 404 Not Found"
    assert status_line(demo.port, upgrade_request(WS_PATH)) == b"HTTP/1.1 101 Switching Protocols"


def sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def test_without_demo_page_there_is_no_page(shoal: Shoal) -> None:
    status, headers, body = get(f"http://127.0.0.1:{shoal.port}/")
    assert (status, body) == (404, b"Not Found\n")
    assert "Content-Security-Policy" not in headers


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail("chromium is missing but could be installed: run ./dev test")
        pytest.skip("no chromium, and no apt-get as root to install it (./dev test would)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


class Pages:
    """Chat pages of one test, each in a browser context of its own (its own cookies and
    storage: another person), and what went wrong in them: a script or style the policy
    blocked, an uncaught exception. (A refused connection while the server is down, and
    the missing favicon, are console errors too, and expected.)"""

    def __init__(self, browser: Browser, node: Shoal) -> None:
        self.browser = browser
        self.url = f"http://127.0.0.1:{node.port}/"
        self.pages: dict[str, Page] = {}
        self.problems: list[str] = []

    def open(self, name: str, *, user: str = "", token: str = "", room: str = "lobby") -> Page:
        """A page that connected and joined `room` (`user`: what goes in the user field)."""
        page = self.browser.new_context().new_page()
        page.set_default_timeout(ms(10))
        self.pages[name] = page
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(str(error)))
        page.goto(self.url)
        # The script ran: the policy let it.
        expect(page.locator("#state")).to_have_attribute("data-state", "offline")
        if user:
            page.fill("#user", user)
        if token:
            page.fill("#token", token)
        page.fill("#room", room)
        page.click("#connect")
        expect(page.locator("#state")).to_have_attribute("data-state", "connected")
        expect(page.locator("#room-name")).to_have_text(room)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.problems.append(message.text)

    def close(self, test: str) -> None:
        """Keep a screenshot of each page as it was last (`last-<test>-<page>.png`: what a
        failure looked like), then close it."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name, page in self.pages.items():
            with contextlib.suppress(PlaywrightError):  # a crashed page has no picture
                page.screenshot(path=ARTIFACTS / f"last-{test}-{name}.png", full_page=True)
            page.context.close()


@pytest.fixture
def pages(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[[Shoal], Pages]]:
    """`pages(node)`: a `Pages` on `node`, closed after the test."""
    made: list[Pages] = []

    def make(node: Shoal) -> Pages:
        made.append(Pages(browser, node))
        return made[-1]

    yield make
    for each in made:
        each.close(request.node.name)


def say(page: Page, text: str, to: str = "") -> None:
    page.select_option("#to", to)
    page.fill("#message", text)
    page.press("#message", "Enter")


def logged(page: Page, kind: str, text: str) -> Locator:
    """The log entries of `kind` (room, private, notice, error) holding `text`."""
    return page.locator(f"#log li.{kind}", has_text=text)


def members(page: Page) -> Locator:
    return page.locator("#members li")


def test_two_people_chat_and_come_back_after_a_restart(
    demo: Shoal, pages: Callable[[Shoal], Pages]
) -> None:
    chat = pages(demo)
    ann = chat.open("ann", user="ann")
    bob = chat.open("bob", user="bob")
    expect(members(ann)).to_have_text(["ann", "bob"])
    expect(members(bob)).to_have_text(["ann", "bob"])
    expect(ann.locator("#members li.me")).to_have_text("ann")

    say(ann, "hello from ann")
    say(bob, "hi ann, bob here")
    for page in (ann, bob):
        expect(logged(page, "room", "hello from ann")).to_have_text(re.compile("ann"))
        expect(logged(page, "room", "bob here")).to_have_count(1)

    # A third person in the room sees room messages, never another's private one.
    cyd = chat.open("cyd", user="cyd")
    expect(members(ann)).to_have_text(["ann", "bob", "cyd"])
    expect(logged(ann, "notice", "cyd joined")).to_have_count(1)
    say(ann, "<b>only for bob</b>", to="bob")
    expect(logged(bob, "private", "<b>only for bob</b>")).to_have_text(re.compile("ann → you"))
    expect(logged(ann, "private", "you → bob")).to_have_count(1)
    # Text is text: the markup arrived as characters, and made no element.
    assert bob.locator("#log b").count() == 0
    # The private message left ann before this one; cyd would have had it first.
    say(ann, "after the secret")
    expect(logged(cyd, "room", "after the secret")).to_have_count(1)
    expect(logged(cyd, "private", "only for bob")).to_have_count(0)
    expect(logged(ann, "private", "ann → you")).to_have_count(0)

    # Leaving is seen by the others.
    cyd.click("#disconnect")
    expect(cyd.locator("#state")).to_have_attribute("data-state", "offline")
    expect(members(ann)).to_have_text(["ann", "bob"])
    expect(logged(bob, "notice", "cyd left")).to_have_count(1)

    # A full restart on the same port: the pages are told 1001, wait, and come back.
    demo.stop()
    for page in (ann, bob):
        expect(logged(page, "notice", "1001 server shutting down")).to_have_count(1)
        expect(page.locator("#state")).to_have_attribute("data-state", "reconnecting")
        expect(page.locator("#room-name")).to_have_text("no room")
        expect(members(page)).to_have_count(0)
    demo.start()
    for page in (ann, bob):
        # The backoff grows while the node is down: allow for a few of its steps.
        expect(page.locator("#state")).to_have_attribute("data-state", "connected", timeout=ms(60))
        expect(logged(page, "notice", "reconnected after")).to_have_count(1)
        # The room was joined again, with no one's help.
        expect(page.locator("#room-name")).to_have_text("lobby")
        expect(members(page)).to_have_text(["ann", "bob"])
    say(bob, "still here after the restart")
    expect(logged(ann, "room", "still here after the restart")).to_have_count(1)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo-page.png"
    ann.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 0 and shot.stat().st_mtime > time.time() - 60
    assert chat.problems == []


@pytest.fixture
def guarded(tmp_path: Path, settings: dict[str, Any]) -> Iterator[Shoal]:
    """A node serving the demo page that checks tokens (guests allowed)."""
    node = Shoal(
        tmp_path,
        {
            **settings,
            "server": {"demo_page": True},
            "auth": {"jwt": {"secret": SECRET}, "required": False},
        },
    )
    yield node.start()
    node.stop()


def token(sub: str, role: str = "user") -> str:
    return jwt.encode(
        {"sub": sub, "role": role, "exp": int(time.time() + 300)}, SECRET, algorithm="HS256"
    )


def test_with_a_token_and_a_kick_the_page_does_not_come_back(
    guarded: Shoal, pages: Callable[[Shoal], Pages]
) -> None:
    chat = pages(guarded)
    # The token names the user: the page asks for no name.
    ann = chat.open("ann", token=token("ann"))
    expect(ann.locator("#user")).to_be_hidden()
    expect(ann.locator("#state")).to_have_text("connected as ann")
    expect(members(ann)).to_have_text(["ann"])
    url = f"ws://127.0.0.1:{guarded.port}/ws?token={token('mod', 'moderator')}"
    with Client(url, timeout=10 * SCALE) as moderator:
        moderator.receive_json()  # authenticated
        kicked = moderator.request({"type": "kick_user", "user_id": "ann", "reason": "spam"},
                                   "user_kicked")  # fmt: skip
    assert kicked["connections"] == 1
    # 4003: the page says why and stays away; its state is decided as the close arrives.
    expect(ann.locator("#state")).to_have_attribute("data-state", "stopped")
    expect(ann.locator("#state")).to_have_text(re.compile("kicked; not reconnecting"))
    expect(logged(ann, "error", "kicked by mod: spam")).to_have_count(1)
    expect(ann.locator("#connect")).to_be_visible()
    assert chat.problems == []
