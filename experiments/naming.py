"""Naming a run or model folder by its own name. Only the standard library: the CLI's usage checks import it
before torch.

    >>> folder_name("runs/attn-2l/.")
    'attn-2l'
"""

from __future__ import annotations

import os
from pathlib import Path


def folder_name(path: str | os.PathLike) -> str:
    """The folder's own name, ``.`` and ``..`` resolved (``Path("runs/x/.").name`` is ``"x"``, but
    ``Path("..").name`` is ``".."``); symbolic links are kept, not followed: a link is named as it is spelled."""
    return Path(os.path.abspath(path)).name
