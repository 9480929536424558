"""Where cryokern keeps what it generates once and reuses: the synthetic dataset, kernel sources."""
import os
from pathlib import Path


def cache_root():
    """$CRYOKERN_CACHE, else $XDG_CACHE_HOME/cryokern, else ~/.cache/cryokern."""
    root = os.environ.get("CRYOKERN_CACHE") or \
        os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cryokern")
    return Path(root)
