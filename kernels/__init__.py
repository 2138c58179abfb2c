"""sparsediff's attention kernels, installed as `sparsediff.kernels` (see pyproject.toml's package-dir).

This folder sits at the repository's root, so wherever the root is on `sys.path` (`python -m ...` or `python -c` run
from a checkout, pytest's `pythonpath`) it is also found as a top-level `kernels`, the name of the PyPI package that
transformers (5.25 and later requires it) and diffusers import. Imported under that name, it hands the name to the
PyPI package, found on the rest of `sys.path`, so a checkout never shadows it. (The folder keeps the name DESIGN.md
gives it; nothing of sparsediff imports it as `kernels`.)
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ImportError(
            f"No module named 'kernels' outside {_root}: that folder is sparsediff's, imported as `sparsediff.kernels`; "
            "install the PyPI package `kernels` if you meant it.", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_module)
