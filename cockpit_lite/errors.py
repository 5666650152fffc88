"""The warning class of every warning the cockpit issues, so users can filter them as one:

warnings.filterwarnings("ignore", category=cockpit_lite.CockpitWarning)
"""

from __future__ import annotations

import warnings


class CockpitWarning(RuntimeWarning):
    """Something the cockpit could not compute or write; training is unaffected."""


def warn(message: str, stacklevel: int = 3) -> None:
    """Issue ``message`` as a :class:`CockpitWarning` prefixed with ``cockpit-lite: ``."""
    warnings.warn(f"cockpit-lite: {message}", CockpitWarning, stacklevel=stacklevel)
