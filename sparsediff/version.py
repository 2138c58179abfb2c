"""The installed sparsediff version (its own module, so the core can record it without importing the package face)."""

__version__ = "0.1.0"
