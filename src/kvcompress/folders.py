"""Where kvcompress keeps what it builds once and reuses: converted models, calibrations, compiled kernels.

A module of its own, with no heavy imports, so the kernels' loader (:mod:`kvcompress.native`) and the
calibrations find the folder without importing the model loader.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return the folder that holds converted models, calibrations and compiled kernels.

    Returns:
        ``$KVCOMPRESS_CACHE`` if set, else ``$XDG_CACHE_HOME/kvcompress``, else
        ``~/.cache/kvcompress``. The folder may not exist yet.
    """
    if os.environ.get("KVCOMPRESS_CACHE"):
        return Path(os.environ["KVCOMPRESS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvcompress"
