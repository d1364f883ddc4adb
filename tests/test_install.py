"""A non-editable `pip install .` ships sparserun.kernels (kernels/ mapped by pyproject) and the CLI.

Builds from a copy of the source tree (the checkout is never written: no build/ or egg-info left behind)
into a --target directory, then imports from a subprocess whose cwd is elsewhere, so neither the checkout
nor the editable install can satisfy the import. Takes ~10-30 s (a real wheel build).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_ships_kernels(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist",
                                                             "tests", "benchmarks", ".venv", ".pytest_cache"))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (target / "sparserun" / "kernels" / "__init__.py").is_file()
    assert not (target / "kernels").exists(), "kernels/ must ship inside the package, not as a top-level one"
    kernel_files = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(p.name for p in (target / "sparserun" / "kernels").glob("*.py")) == kernel_files
    # the CUDA sources ship too, so the extension can be built on first use from a wheel install
    assert (target / "sparserun" / "csrc" / "semi24_gemm.cu").is_file()
    assert (target / "sparserun" / "csrc" / "semi24_binding.cpp").is_file()

    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import sparserun, sparserun.kernels, sparserun.formats, sparserun.runtime.linear, sparserun.cli;"
            "from sparserun.runtime import cuda_ext;"
            "print(sparserun.__file__); print(sparserun.kernels.__file__); print(cuda_ext._CSRC)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    paths = r.stdout.split()
    assert all(p.startswith(str(target)) for p in paths), paths
    script = target / "bin" / "sparserun"
    assert script.is_file(), "the sparserun console script is installed"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == 0 and "inspect" in r.stdout, r.stderr[-3000:]
