"""Provenance recorded beside every result: config, seed, package versions, git commit, machine.

Example:
    >>> sorted(provenance(config={"a": 1}, seed=0))
    ['config', 'created', 'git', 'machine', 'seed', 'versions']
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "nnsight", "tokenizers", "numpy", "pandas", "scipy", "seaborn")


def git_commit(cwd: str | Path | None = None) -> dict:
    """Current commit and whether the tree has uncommitted changes (None outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(config: dict, seed: int | None = None, **extra) -> dict:
    """A JSON-serialisable record of how a result was made."""
    import torch

    return {"config": config, "seed": seed, "versions": versions(), "git": git_commit(),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "threads": torch.get_num_threads()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **extra}
