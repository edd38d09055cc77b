"""Autobahn|Testsuite against the whole stack: master, two workers, Redis, the echo app.

Cases 1-7 (framing, pings, reserved bits, opcodes, fragmentation, UTF-8, closing) and
10 (automatic fragmentation). Each must pass, strictly or with an informational note,
except the "Non-Strict" passes websockets' own compliance notes list (below).

`wstest` is Python 2 code: `./dev test` installs it into `.autobahn/` where a Python 2.7
exists; elsewhere this test is skipped with that reason.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from support import SCALE, Shoal

ROOT = Path(__file__).parents[2]
AUTOBAHN = ROOT / ".autobahn"
# websockets' compliance README (compliance/README.rst) lists these as "Non-Strict", the
# test cases being stricter than the RFC: in 3.2, 3.3, 4.1.3, 4.1.4, 4.2.3, 4.2.4 and 5.15
# the connection is failed before the previous frame's echo went out (shoal passes them
# strictly unless that echo waits for the connection's registration in Redis), and in
# 6.4.3 and 6.4.4 invalid UTF-8 is noticed a fragment late.
KNOWN_NON_STRICT = {"3.2", "3.3", "4.1.3", "4.1.4", "4.2.3", "4.2.4", "5.15", "6.4.3", "6.4.4"}


def _wstest() -> list[str]:
    python = AUTOBAHN / "python"
    if not (python.exists() and (AUTOBAHN / "bin" / "wstest").exists()):
        pytest.skip(
            "Autobahn|Testsuite needs Python 2.7, which this machine lacks: "
            "install one (e.g. pyenv install 2.7.18) and run ./dev test"
        )
    return [python.read_text().strip(), str(AUTOBAHN / "bin" / "wstest")]


def test_autobahn_cases_1_to_7_and_10(tmp_path: Path, settings: dict[str, Any]) -> None:
    wstest = _wstest()
    settings["app"] = {"module": "echo"}
    node = Shoal(tmp_path, settings).start()
    try:
        spec = tmp_path / "fuzzingclient.json"
        spec.write_text(
            json.dumps(
                {
                    "outdir": str(tmp_path / "report"),
                    "servers": [{"agent": "shoal", "url": node.url()}],
                    "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"],
                    "exclude-cases": [],
                    "exclude-agent-cases": {},
                }
            )
        )
        subprocess.run(
            [*wstest, "-m", "fuzzingclient", "-s", str(spec)],
            cwd=tmp_path,
            env={"PYTHONPATH": str(AUTOBAHN), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            check=True,
            timeout=300 * SCALE,
        )
    finally:
        node.stop()
    results = json.loads((tmp_path / "report" / "index.json").read_text())["shoal"]
    assert len(results) > 200
    failed = {
        case: (r["behavior"], r["behaviorClose"])
        for case, r in results.items()
        if (
            r["behavior"] not in ("OK", "INFORMATIONAL")
            and not (r["behavior"] == "NON-STRICT" and case in KNOWN_NON_STRICT)
        )
        or r["behaviorClose"] not in ("OK", "INFORMATIONAL")
    }
    assert failed == {}
    assert "Traceback" not in node.log()
