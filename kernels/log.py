"""One warning per distinct message: fallbacks (no GPU, an unsupported call) say why once, not on every call."""

from __future__ import annotations

import logging

_warned: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log `message` as a warning on `logger` the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
