"""The installed namespace: kernels/, search/, pipelines/ live only under sparsediff."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_outside_repo(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)


def test_namespace_imports(tmp_path):
    r = run_outside_repo("import sparsediff, sparsediff.kernels, sparsediff.search, sparsediff.pipelines", tmp_path)
    assert r.returncode == 0, r.stderr


def test_no_generic_top_level_packages(tmp_path):
    for name in ["search", "pipelines"]:
        r = run_outside_repo(f"import {name}", tmp_path)
        assert r.returncode != 0, f"a top-level package {name!r} is importable"
    # `kernels` may exist as the unrelated PyPI package; it must not be ours.
    r = run_outside_repo("import kernels, sys; print(getattr(kernels, '__file__', '') or '')", tmp_path)
    assert r.returncode != 0 or str(ROOT / "kernels") not in r.stdout  # (.venv may sit inside the checkout)


def test_a_checkout_on_sys_path_does_not_shadow_the_pypi_kernels_package():
    """Run from the repository's root (`python -c`, `python -m`, pytest put it on sys.path), `import kernels` finds this
    folder first; it must hand the name to the PyPI package (transformers >= 5.25 requires it and imports it while
    loading `PreTrainedModel`), or say what it is when that package is absent."""
    from importlib.metadata import PackageNotFoundError, version

    code = "import kernels; print(kernels.__file__)"
    try:
        version("kernels")
    except PackageNotFoundError:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "imported as `sparsediff.kernels`" in r.stderr, r.stderr
        return
    code += "; from transformers import PreTrainedModel; import diffusers.loaders.peft; import sparsediff.kernels.spec"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(ROOT / "kernels") not in r.stdout  # the PyPI package, not this folder
