"""Imports run one way: kernels <- model <- serving <- chat <- faces (pyproject's import-linter
contracts), and ``import k2jax`` stays light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("k2jax", "sharding", "convert")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(lint), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def _tree_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the packages and pyproject.toml with ``line`` appended to ``module``."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}\n")
    return tmp_path


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: the model importing the engine (serving, above it) is refused."""
    tree = _tree_with(tmp_path, "k2jax/model/moe.py", "from k2jax.serving import engine  # noqa")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "k2jax.model.moe -> k2jax.serving.engine" in result.stdout, result.stdout


def test_the_model_importing_sharding_breaks_the_contract(tmp_path):
    tree = _tree_with(tmp_path, "k2jax/model/attention.py", "import sharding.rules  # noqa")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "k2jax.model.attention -> sharding.rules" in result.stdout, result.stdout


def test_import_k2jax_loads_no_converter_torch_or_transformers():
    code = (
        "import sys, k2jax\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('convert', 'torch', 'transformers', 'compressed_tensors'))\n"
        "print(heavy)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
