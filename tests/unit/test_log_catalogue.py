"""docs/operations.md lists every log line shoal writes at info or above, and nothing else.

The package's source is read with `ast`: every call of a logger's `info`, `warning`,
`error`, `exception` or `critical` (or `log` with such a level) gives a level and a
message template: its format string, each `%s`, `%d`, `%r`, ... (or f-string field)
made a placeholder. The `## Log lines` section of docs/operations.md holds tables of
`| level | message | meaning |` rows whose message is the same template, each
placeholder written as a name in angle brackets: `"worker %s serving ws://%s:%d%s"` is
documented as `` `worker <id> serving ws://<host>:<port><path>` ``. Templates compare
with every placeholder reduced to `<>` and whitespace runs to one space, so a row says
what the code says, in full, and a new message, a reworded one or a changed level fails
here, naming the source line and the row to write.

A log call whose message is a parameter of its function (a helper that logs what its
callers pass it) stands for its callers' messages: each call of that function in the
same module is a log call, at the helper's level. A message the source does not show
(`logger.warning("%s", warning)`) is listed in `OPAQUE`, with the row that documents it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ("server", "workers", "tasks", "core", "config")
DOC = ROOT / "docs" / "operations.md"
SECTION = "## Log lines"

# Logger methods and the level each logs at: `exception` is `error` with a traceback.
METHODS = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
    "fatal": "critical",
}
DOCUMENTED_LEVELS = ("info", "warning", "error", "critical")
# A receiver named like a logger: logger, log, _log, access_logger, ...
LOGGER_NAME = re.compile(r"^_?([a-z0-9_]*_)?log(ger)?$", re.IGNORECASE)
# One %-style conversion specifier; `%%` is a literal percent sign.
SPECIFIER = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")
DOC_PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
HOLE = "<>"

# Log calls whose message the source does not show, by (file, function): the level and
# message of the row that documents it.
OPAQUE = {
    # The warning `shoal.server.limits.raise_nofile()` returns.
    ("server/master.py", "Master.run"): (
        "warning",
        "open files: the limit is <limit>, below the <need> each worker needs "
        "(server.max_connection <max_connection> over server.worker_num <worker_num>, "
        "plus 1024 for Redis, logs and the listener): a worker will fail to accept "
        "clients (EMFILE) beyond about <count>. To fix it, <fix>; or lower "
        "server.max_connection",
    ),
    # The `ShoalError` that stopped the master before it served.
    ("server/cli.py", "main"): ("error", "<error>"),
}


@dataclass(frozen=True, slots=True)
class LogCall:
    """One log call of the package."""

    where: str
    """`path:line`, the path relative to the repository."""
    function: str
    """The qualified name of the function it is in (`Master.run`), or `<module>`."""
    level: str
    template: str | None
    """None: the source does not show the message (see `OPAQUE`)."""
    source: str
    """The call as written."""

    @property
    def path(self) -> str:
        return self.where.rsplit(":", 1)[0]


@dataclass(frozen=True, slots=True)
class Row:
    """One documented log line."""

    where: str
    level: str
    message: str
    """As the doc writes it."""
    template: str


def normal(text: str) -> str:
    return " ".join(text.split())


def code_template(text: str, formatted: bool) -> str:
    """`worker %s serving ws://%s:%d` -> `worker <> serving ws://<>:<>`.

    Args:
        formatted: `text` goes through %-formatting (logging does that only when the
            call passes arguments); otherwise a `%` in it is only a percent sign.
    """
    if formatted:
        text = SPECIFIER.sub(lambda m: "%" if m.group(0) == "%%" else HOLE, text)
    return normal(text)


def doc_template(message: str) -> str:
    """`worker <id> serving ws://<host>:<port>` -> `worker <> serving ws://<>:<>`."""
    return normal(DOC_PLACEHOLDER.sub(HOLE, message))


def message_template(node: ast.expr, formatted: bool) -> str | None:
    """The template of a message argument (`formatted`: as `code_template`); None when
    the source does not show it: not a string, or placeholders alone (`"%s"`)."""
    template = _template(node, formatted)
    if template is None or not template.replace(HOLE, "").strip():
        return None
    return template


def _template(node: ast.expr, formatted: bool) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return code_template(node.value, formatted)
    if isinstance(node, ast.JoinedStr):
        return normal(
            "".join(
                code_template(value.value, formatted)
                if isinstance(value, ast.Constant) and isinstance(value.value, str)
                else HOLE
                for value in node.values
            )
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return _template(node.left, True)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left, formatted), _template(node.right, formatted)
        if left is None and right is None:
            return None
        return normal(f"{left or HOLE}{right or HOLE}")
    return None


def called(call: ast.Call) -> str:
    """The name of what `call` calls: `f` for `f(...)` and `x.f(...)`."""
    func = call.func
    return str(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))


def is_logger(node: ast.expr, loggers: set[str]) -> bool:
    """The `logging` module, a `getLogger(...)` call, a name the module gave a logger
    (`loggers`), or a name a logger goes by."""
    if isinstance(node, ast.Call):
        return called(node) == "getLogger"
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name == "logging" or name in loggers or LOGGER_NAME.match(name) is not None


def log_level(call: ast.Call, loggers: set[str]) -> str | None:
    """The level `call` logs at; None if it is not a logging call.

    `log(level, ...)` with a level the source does not spell out counts as `info`: it
    had better be listed than missed.
    """
    func = call.func
    if not isinstance(func, ast.Attribute) or not is_logger(func.value, loggers):
        return None
    if func.attr in METHODS:
        return METHODS[func.attr]
    if func.attr == "log" and call.args:
        level = call.args[0]
        name = level.attr if isinstance(level, ast.Attribute) else getattr(level, "id", "")
        return METHODS.get(str(name).lower(), "info")
    return None


def argument(call: ast.Call, index: int, keyword: str) -> ast.expr | None:
    if index < len(call.args):
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


Scope = ast.FunctionDef | ast.AsyncFunctionDef | None


class _Calls(ast.NodeVisitor):
    """Every call of a module, with the function it is in, and the names (variables,
    attributes) it assigns a `getLogger(...)` to."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.functions: list[Scope] = [None]
        self.calls: list[tuple[str, Scope, ast.Call]] = []
        self.loggers: set[str] = set()

    def visit_Assign(self, node: ast.Assign | ast.AnnAssign) -> None:
        if isinstance(node.value, ast.Call) and called(node.value) == "getLogger":
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                if name:
                    self.loggers.add(name)
        self.generic_visit(node)

    visit_AnnAssign = visit_Assign

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.names.append(node.name)
        self.generic_visit(node)
        self.names.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.names.append(node.name)
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()
        self.names.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        self.calls.append((".".join(self.names) or "<module>", self.functions[-1], node))
        self.generic_visit(node)


def _parse(path: Path) -> ast.Module:
    """`ast.parse`, tried again once on a SystemError: before 3.11.8, CPython's AST
    constructor keeps one recursion counter for every thread (gh-106905), so another
    thread of the test process formatting a traceback at the same moment (3.11 parses
    the source line to underline it) can make a correct parse fail."""
    source = path.read_text()
    try:
        return ast.parse(source, str(path))
    except SystemError:
        return ast.parse(source, str(path))


def module_log_calls(path: Path) -> list[LogCall]:
    """The log calls of one module, those of its logging helpers' callers included."""
    relative = path.relative_to(ROOT).as_posix()
    visitor = _Calls()
    visitor.visit(_parse(path))
    found: list[LogCall] = []
    # Helpers that log a parameter: name -> (its position in a call, its name, the level,
    # whether the helper's log call formats it).
    helpers: dict[str, tuple[int, str, str, bool]] = {}
    for name, function, call in visitor.calls:
        level = log_level(call, visitor.loggers)
        if level is None:
            continue
        position = 1 if called(call) == "log" else 0
        message = argument(call, position, "msg")
        if message is None:
            continue
        formatted = len(call.args) > position + 1  # logging formats only with arguments
        template = message_template(message, formatted)
        if template is None and isinstance(message, ast.Name) and function is not None:
            params = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
            if message.id in params:
                # Called as `self.helper(...)`: `self` is not among the call's arguments.
                skip = 1 if params[0] in ("self", "cls") else 0
                index = params.index(message.id) - skip
                helpers[function.name] = (index, message.id, level, formatted)
                continue
        found.append(LogCall(f"{relative}:{call.lineno}", name, level, template, ast.unparse(call)))
    for name, _, call in visitor.calls:
        if called(call) not in helpers:
            continue
        index, keyword, level, formatted = helpers[called(call)]
        message = argument(call, index, keyword)
        if message is not None:
            template = message_template(message, formatted)
            found.append(
                LogCall(f"{relative}:{call.lineno}", name, level, template, ast.unparse(call))
            )
    return found


def package_log_calls() -> list[LogCall]:
    calls = [
        call
        for folder in PACKAGE
        for path in sorted((ROOT / folder).rglob("*.py"))
        for call in module_log_calls(path)
    ]
    # The walk itself is under test: a broken one would find nothing to miss.
    assert len(calls) > 50, f"found only {len(calls)} log calls in {', '.join(PACKAGE)}"
    return calls


def documented() -> tuple[list[Row], list[str]]:
    """The rows of the section's `| Level | Message | Meaning and action |` tables, and
    the lines of those tables that cannot be read as rows. Other tables are skipped."""
    lines = DOC.read_text().splitlines()
    assert SECTION in lines, f"docs/operations.md has no {SECTION!r} section"
    start = lines.index(SECTION) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows: list[Row] = []
    problems: list[str] = []
    header: list[str] = []
    for number in range(start, end):
        line = lines[number].strip()
        if not line.startswith("|"):
            header = []
            continue
        # A `|` in a cell, code spans included, is written `\|`.
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if not header:
            header = cells
            continue
        if header[:2] != ["Level", "Message"] or not cells[0].strip("-: "):
            continue  # another kind of table, or the header's separator
        message = cells[1] if len(cells) == len(header) else ""
        if cells[0] not in DOCUMENTED_LEVELS or not re.fullmatch(r"`[^`]+`", message):
            where = f"docs/operations.md:{number + 1}"
            problems.append(f"{where}: not a row | level | `message` | meaning |: {line}")
            continue
        text = message.strip("`").replace("\\|", "|")
        where = f"docs/operations.md:{number + 1}"
        rows.append(Row(where, cells[0], text, doc_template(text)))
    assert rows, f"docs/operations.md: no log lines in {SECTION!r}"
    return rows, problems


def test_every_log_line_is_documented() -> None:
    rows, _ = documented()
    problems = []
    by_template = {row.template: row for row in rows}
    known = {(row.level, row.template) for row in rows}
    for call in package_log_calls():
        if call.level == "debug":
            continue
        if call.template is None:
            opaque = OPAQUE.get((call.path, call.function))
            if opaque is None:
                problems.append(
                    f"{call.where}: {call.level} {call.source}: the message is not written "
                    f"out here; add ({call.path!r}, {call.function!r}) to OPAQUE in "
                    f"tests/unit/test_log_catalogue.py with the row that documents it"
                )
                continue
            level, template = opaque[0], doc_template(opaque[1])
        else:
            level, template = call.level, call.template
        if (level, template) in known:
            continue
        row = by_template.get(template)
        if row is not None:
            problems.append(
                f"{call.where}: {level} {call.source}: documented at {row.level} on "
                f"{row.where}; the code logs it at {level}"
            )
        else:
            problems.append(
                f"{call.where}: {level} {call.source}: not in docs/operations.md "
                f"{SECTION!r}; document it as | {level} | `{template.replace(HOLE, '<?>')}` | "
                "meaning and action |"
            )
    assert not problems, "log lines not documented:\n" + "\n".join(problems)


def test_every_documented_line_is_logged() -> None:
    rows, problems = documented()
    calls = package_log_calls()
    logged: dict[tuple[str, str], LogCall] = {}
    for call in calls:
        key = (call.path, call.function)
        if call.template is not None:
            logged[(call.level, call.template)] = call
        elif key in OPAQUE:
            level, message = OPAQUE[key]
            logged[(level, doc_template(message))] = call
    for key in OPAQUE.keys() - {(c.path, c.function) for c in calls if c.template is None}:
        problems.append(
            f"tests/unit/test_log_catalogue.py: OPAQUE names {key}, which logs no such message"
        )
    by_template = {template: call for (_, template), call in logged.items()}
    for row in rows:
        if (row.level, row.template) in logged:
            continue
        match = by_template.get(row.template)
        if match is not None:
            problems.append(
                f"{row.where}: {row.level} `{row.message}`: {match.where} logs it at "
                f"{match.level}" + (" (not listed)" if match.level == "debug" else "")
            )
        else:
            problems.append(f"{row.where}: {row.level} `{row.message}`: no log call writes it")
    assert not problems, "documented log lines shoal does not write:\n" + "\n".join(problems)
