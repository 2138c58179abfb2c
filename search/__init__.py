"""Profiling statistics, the measured cost model and the Optuna study that turn a profile into a plan.

`sparsediff.search` is this package, and calling it runs a search: `sparsediff.search(pipe, profile, out=...)` is
`sparsediff.api.search` (the package cannot also be a function, so the module itself is made callable; the call
imports the public API lazily, keeping `search` below it in the dependency order).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from sparsediff.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
