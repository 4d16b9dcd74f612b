"""Code health, checked like behaviour: ruff (configured in pyproject.toml) and the layering rules of
docs/architecture.md — sd2/ never imports Prefect, and no function in sd2/, tasks/, flows/ grows past 80 lines."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [*ROOT.glob("sd2/**/*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("flows/*.py")]


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a test dependency (pip install -e .[test])"
    r = subprocess.run([ruff, "check", "sd2", "tasks", "flows", "bench", "tests"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_library_never_imports_prefect():
    """The library is plain Python; only the `sd2` command (cli.py) reaches up to the flows it runs."""
    for f in ROOT.glob("sd2/**/*.py"):
        if f.name == "cli.py":
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("prefect", "flows", "tasks") for n in names), (f, names)


def test_no_function_longer_than_80_lines():
    long = []
    for f in CODE:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
