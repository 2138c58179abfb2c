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
    assert r.returncode != 0 or str(ROOT) not in r.stdout
