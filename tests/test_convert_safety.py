"""The converter never deletes what it did not create (issue: nothing a user owns is deleted).

Each case runs the real CLI in a subprocess and then checks that the source checkpoint and any
unrelated folder are byte for byte intact."""

import hashlib
import os
import subprocess
import sys

import pytest
import reference

from convert import checkpoint_format as fmt
from convert.converter import PARTIAL_MARKER, convert


def _digest(path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "convert", *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ref = reference.build(seed=5, num_hidden_layers=2)
    return reference.write_checkpoint(ref, tmp_path_factory.mktemp("parent") / "src")


@pytest.fixture
def pristine(source):
    before = _digest(source)
    yield source
    assert _digest(source) == before, "the source checkpoint was changed"


def _one_error_line(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_output_equal_to_the_source_is_refused(pristine, force):
    result = _cli(pristine, pristine, *force)
    _one_error_line(result, pristine, "source")


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_output_containing_the_source_is_refused(pristine, force):
    parent = os.path.dirname(pristine)
    before = _digest(parent)
    result = _cli(pristine, parent, *force)
    _one_error_line(result, "contains the source")
    assert _digest(parent) == before


def test_output_inside_the_source_is_refused(pristine):
    result = _cli(pristine, os.path.join(pristine, "converted"), "--force")
    _one_error_line(result, "inside the source")
    assert not os.path.exists(os.path.join(pristine, "converted"))


def test_force_replaces_only_the_converters_own_output(pristine, tmp_path):
    other = tmp_path / "k2"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    result = _cli(pristine, other, "--force")
    _one_error_line(result, str(other), "not a k2jax checkpoint")
    assert (other / "precious.txt").read_text() == "keep"
    # An empty directory is fine, and a finished k2jax checkpoint is replaced by --force.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(pristine, empty).returncode == 0
    assert fmt.is_converted_checkpoint(empty)
    assert _cli(pristine, empty, "--force").returncode == 0
    assert fmt.is_converted_checkpoint(empty)
    assert not [p for p in os.listdir(tmp_path) if ".old" in p]


def test_force_leaves_a_users_old_folder_alone(pristine, tmp_path):
    out = tmp_path / "k2"
    convert(pristine, out, quiet=True)
    users = tmp_path / "k2.old"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert _cli(pristine, out, "--force").returncode == 0
    assert (users / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags", [["--resume"], [], ["--force"], ["--resume", "--force"]])
def test_a_partial_folder_the_converter_never_wrote_is_left_alone(pristine, tmp_path, flags):
    out = tmp_path / "k2"
    foreign = tmp_path / "k2.partial"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"unrelated")
    (foreign / "state.json").write_text("{}")  # looks like ours, but carries no marker
    result = _cli(pristine, out, *flags)
    _one_error_line(result, str(foreign), "not written by k2jax-convert")
    assert "interrupted" not in result.stderr
    assert sorted(os.listdir(foreign)) == ["data.bin", "state.json"]
    assert (foreign / "data.bin").read_bytes() == b"unrelated"
    assert not out.exists()


def test_a_partial_the_converter_wrote_is_resumed(pristine, tmp_path):
    out = tmp_path / "k2"
    from convert.converter import KILL_ENV

    killed = subprocess.run(
        [sys.executable, "-m", "convert", pristine, str(out), "--quiet"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", KILL_ENV: "1"},
        capture_output=True,
    )
    assert killed.returncode == -9
    assert os.path.isfile(os.path.join(f"{out}.partial", PARTIAL_MARKER))
    assert _cli(pristine, out, "--resume").returncode == 0
    assert fmt.is_converted_checkpoint(out)
    assert not os.path.exists(os.path.join(out, PARTIAL_MARKER))


def test_output_that_is_a_file_is_refused(pristine, tmp_path):
    target = tmp_path / "k2"
    target.write_text("a file")
    result = _cli(pristine, target, "--force")
    _one_error_line(result, str(target), "not a directory")
    assert target.read_text() == "a file"
