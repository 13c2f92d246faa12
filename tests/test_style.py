"""The package reads as the formatter writes it (no hand-packed lines, no unused names); the README stays short
and the docs' links hold."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_package_is_formatted_and_has_no_unused_names() -> None:
    formatted = ruff("format", "--check", "pipeline")
    assert formatted.returncode == 0, f"run `ruff format pipeline`:\n{formatted.stdout}{formatted.stderr}"
    checked = ruff("check", "--select", "F,E9", "pipeline")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    skipped = [str(path.relative_to(ROOT)) for path in (ROOT / "pipeline").rglob("*.py") if "fmt: skip" in path.read_text()]
    assert not skipped, f"hand-formatted lines (# fmt: skip) in {skipped}"


def test_no_module_over_450_lines_and_no_function_over_60() -> None:
    import ast

    long_modules, long_functions = [], []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 450:
            long_modules.append(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_the_readme_stays_under_12_kb_and_every_local_link_in_the_docs_resolves() -> None:
    import re

    readme = ROOT / "README.md"
    assert len(readme.read_bytes()) <= 12_000, "README.md is over 12 KB: move details to docs/"
    broken = []
    for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            target = link.split("#")[0]
            if target and not link.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, broken
