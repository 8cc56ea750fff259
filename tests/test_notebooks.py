"""The notebooks under ``notebooks/`` run top to bottom on the CPU, and are stored clean.

Each notebook is executed with nbclient in a fresh ``python3`` kernel whose working directory is
the repository root, with ``JAX_PLATFORMS`` unset as a user has it. The kernel inherits this
process's environment, so the test sets it for the kernel: no ``XLA_FLAGS`` (the quickstart
sees one CPU device, as a user does; ``tpu_slice`` asks for its own 8 fake devices), no
checkpoint, and nothing that looks like Colab, so the install cells install nothing. Any cell
error fails the test, every cell asserts what it shows, and no cell may print libtpu's probe
lines or absl warnings.
"""

from __future__ import annotations

import os

import nbclient  # in the test extra: if it is missing this must fail, not skip
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ["quickstart.ipynb", "tpu_slice.ipynb"]
CELL_TIMEOUT_S = 300


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    path = os.path.join(NOTEBOOKS, name)
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name}: clear the outputs before committing (cell {cell.source[:60]!r})"
        )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_cpu(name, monkeypatch):
    # JAX_PLATFORMS left unset, as a user leaves it: k2jax picks the CPU itself, quietly.
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets the kernel's debugger
    for var in ("XLA_FLAGS", "K2JAX_CHECKPOINT", "K2JAX_REPO_URL", "COLAB_RELEASE_TAG"):
        monkeypatch.delenv(var, raising=False)
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": ROOT}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name}: a cell failed:\n{str(err)[-4000:]}")
    cells = _code_cells(nb)
    assert all(c.execution_count for c in cells), f"{name}: not every cell ran"
    # Quiet on a host without a TPU: no libtpu probe lines or absl warnings in any cell.
    printed = "".join(o.get("text", "") for c in cells for o in c.outputs if "text" in o)
    noise = [w for w in ("libtpu", "INVALID_ARGUMENT", "E0000", "OCDBT") if w in printed]
    assert noise == [], f"{name}: printed {noise}"
    setup = _stdout(cells[0])
    assert "not installing anything" in setup, setup  # the install cell stayed off
    if name == "tpu_slice.ipynb":
        assert "using fake CPU devices" in setup, setup
        assert "mesh {'data': 1, 'expert': 4, 'tensor': 2}" in "".join(map(_stdout, cells))
