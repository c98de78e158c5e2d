"""Package surface: cheap import, every exported name resolves, the CLI's smoke run works."""

from __future__ import annotations

import subprocess
import sys

import pytest

import diffusekit


def test_import_does_not_load_torch_or_hub():
    code = "import sys, diffusekit; print(sorted(m for m in ('torch', 'huggingface_hub', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(diffusekit._EXPORTS))
def test_every_export_resolves(name):
    assert getattr(diffusekit, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        diffusekit.NotAThing


def test_demo_command_writes_a_grid(tmp_path):
    from diffusekit.__main__ import main

    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    from PIL import Image

    grid = Image.open(tmp_path / "ddpm-grid.png")
    assert grid.size == (64, 64)
    assert (tmp_path / "tiny-ddpm" / "model_index.json").exists()


def test_package_data_ships_the_native_kernels_sources():
    """A wheel carries every file the run-time kernel build reads (sources and headers): a source left out of
    ``package-data`` would leave an installed (not editable) diffusekit without its CPU kernels, which the editable
    test install would never notice. Checked against the patterns setuptools applies."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from diffusekit import cpu_attention

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffusekit"]
    package = Path(cpu_attention.__file__).parent
    for path in cpu_attention.SOURCES + cpu_attention.HEADERS:
        name = path.relative_to(package).as_posix()
        assert path.exists() and any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
