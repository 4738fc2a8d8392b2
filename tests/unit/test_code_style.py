"""The linters the code's suppressions refer to, run by the test command: ruff's rules, ruff's
formatter and mypy, each configured once in pyproject.toml. (The Java lint is javac's
``-Xlint:all -Werror`` in jvm/pom.xml: the build that scripts/setup.sh runs fails on a warning.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "."), ("ruff", "format", "--check", "."), ("mypy",)],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_code_passes_its_linters(command: tuple[str, ...]) -> None:
    done = _run(*command)
    assert done.returncode == 0, f"{' '.join(command)} found:\n{done.stdout}{done.stderr}"


def test_the_java_build_fails_on_any_warning() -> None:
    pom = (REPO_ROOT / "jvm" / "pom.xml").read_text()
    assert "<arg>-Xlint:all,-processing</arg>" in pom and pom.count("<arg>-Werror</arg>") == 2
