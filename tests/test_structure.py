"""The shape of the code, checked like behaviour: the import layering, module and
function size, and the formatter as the one judge of layout."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
MAX_MODULE_LINES = 400


def test_the_import_contracts_hold() -> None:
    """Entry points -> components -> core; components never import each other; the
    pure parts do no I/O (contracts in pyproject.toml, [tool.importlinter])."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in (ROOT / "nebula").rglob("*.py")
    }
    over = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


# The formatter decides layout. A line it may not touch is a data table laid out
# by hand, and each is named here.
FORMATTED_BY_HAND = {"harness/workloads.py"}


def test_the_formatter_is_skipped_only_for_data_tables() -> None:
    skipped = {
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("nebula", "harness", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if str(path.relative_to(ROOT)) not in FORMATTED_BY_HAND
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: skip" in line or "fmt: off" in line
    }
    assert not skipped, f"layout by hand outside a data table: {sorted(skipped)}"


MAX_FUNCTION_LINES = 60


def test_every_function_reads_at_a_glance() -> None:
    """A function (its nested ones included) longer than this does several things:
    cut it into named phases that read top-down."""
    long = []
    for path in (ROOT / "nebula").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {sorted(long)}"
