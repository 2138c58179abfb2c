"""Profiling statistics, the measured cost model and the Optuna study that turn a profile into a plan.

The public search function is `sparsediff.search_plan` (in `sparsediff.api`, above this package); this package holds
its parts and imports nothing above the core.
"""
