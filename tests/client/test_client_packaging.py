"""The client-only distribution: `shoal-client` builds from client/pyproject.toml, holds
shoal.client and shoal.core.schema alone, requires websockets and typing_extensions
alone, and talks to a live server from an environment that has nothing else, from Python
and with its `shoal-connect` command."""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from support import SCALE, Shoal

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("websockets", "typing_extensions")


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy holding client/ and the two files of core/ the client
    distribution names: if it needed any other, the build or the import would fail."""
    source = tmp_path / "src"
    shutil.copytree(
        ROOT / "client",
        source / "client",
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    (source / "core").mkdir()
    for name in ("__init__.py", "schema.py"):
        shutil.copy(ROOT / "core" / name, source / "core" / name)
    out = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source / "client")],
        check=True, env=_offline(),
    )  # fmt: skip
    (wheel,) = out.glob("shoal_client-*.whl")
    return wheel


def _offline() -> dict[str, str]:
    """pip with no configured index or find-links: nothing comes from elsewhere."""
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}


def test_the_wheel_holds_the_client_and_the_schema_and_requires_websockets(
    tmp_path: Path,
) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(
            archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        )
        scripts = archive.read(next(n for n in names if n.endswith("/entry_points.txt")))
    modules = sorted(n for n in names if not n.split("/")[0].endswith(".dist-info"))
    client = sorted(p.name for p in (ROOT / "client").glob("*.py"))
    assert modules == sorted(
        [f"shoal/client/{name}" for name in client]
        + ["shoal/client/py.typed", "shoal/core/__init__.py", "shoal/core/schema.py"]
    )
    requires = sorted(metadata.get_all("Requires-Dist") or [])
    assert requires == ["typing_extensions>=4.6", "websockets<18,>=17.0.1"]
    assert metadata["Name"] == "shoal-client"
    assert scripts.decode().split() == [
        "[console_scripts]",
        "shoal-connect",
        "=",
        "shoal.client.terminal:main",
    ]


def test_a_client_only_install_talks_to_a_live_server(tmp_path: Path, shoal: Shoal) -> None:
    """A fresh environment with websockets and typing_extensions alone (copied from this
    one, file by file, with their metadata); pip installs the wheel into it with no index,
    so any other requirement would fail the install."""
    wheel = build_wheel(tmp_path)
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    for name in NEEDED:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or ():
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # scripts outside site-packages, compiled caches
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(str(dist.locate_file(file)), target)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-index", str(wheel)],
        check=True, env=_offline(),
    )  # fmt: skip
    script = textwrap.dedent(
        f"""
        import importlib.metadata, importlib.util, sys
        from shoal.client import Client

        with Client("ws://127.0.0.1:{shoal.port}/ws?user_id=slim", timeout={10 * SCALE}) as c:
            welcome = c.receive_json()
        installed = sorted(d.metadata["Name"] for d in importlib.metadata.distributions())
        absent = [m for m in ("shoal.server", "shoal.workers", "shoal.core.protocol", "redis",
                              "pydantic", "uvloop", "orjson")
                  if importlib.util.find_spec(m) is not None]
        print(welcome["user_id"], installed, absent)
        """
    )
    result = subprocess.run(
        [str(python), "-I", "-c", script], capture_output=True, text=True, timeout=60 * SCALE
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 1)[0] == "slim"
    assert result.stdout.strip() == "slim ['shoal-client', 'typing_extensions', 'websockets'] []"

    # The terminal client's command, as pip installed it: the end of input closes it.
    connect = subprocess.run(
        [str(fresh / "bin" / "shoal-connect"), "--json", shoal.url("term")],
        input='{"type": "presence"}\n', capture_output=True, text=True, timeout=60 * SCALE,
    )  # fmt: skip
    assert connect.returncode == 0, connect.stderr
    welcome, presence = (json.loads(line) for line in connect.stdout.splitlines())
    assert (welcome["type"], welcome["user_id"]) == ("welcome", "term")
    assert presence["type"] == "presence"
