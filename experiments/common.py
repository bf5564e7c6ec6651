"""Shared plumbing for experiments: result folders, atomic tidy tables, provenance, resumable units.

Every table is a CSV written atomically (temp file + rename) and recorded with its sha256 in the
experiment's ``manifest.json``; reading a table verifies it, so a truncated or edited file is caught
with a message naming what to delete. A unit of work (one model, one checkpoint) is skipped on re-run
when its table is already recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from interventions.zoo.provenance import provenance
from interventions.zoo.train import atomic_write_text


class ResultError(RuntimeError):
    """A result file is missing, truncated or modified."""


class Results:
    """One experiment's folder of tidy tables: ``Results(root, "phase_change")``."""

    def __init__(self, root: str | Path, name: str):
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"

    def _manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            raise ResultError(f"{self.manifest_path} is corrupted: delete the folder {self.dir} and re-run "
                              "the experiment") from None

    def has(self, table: str) -> bool:
        return table in self._manifest() and (self.dir / f"{table}.csv").is_file()

    def write(self, table: str, df: pd.DataFrame) -> Path:
        path = self.dir / f"{table}.csv"
        atomic_write_text(path, df.to_csv(index=False))
        manifest = self._manifest()
        manifest[table] = hashlib.sha256(path.read_bytes()).hexdigest()
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
        return path

    def read(self, table: str) -> pd.DataFrame:
        path = self.dir / f"{table}.csv"
        manifest = self._manifest()
        if table not in manifest or not path.is_file():
            raise ResultError(f"result table {path} is missing: run the experiment that writes it first")
        if hashlib.sha256(path.read_bytes()).hexdigest() != manifest[table]:
            raise ResultError(f"result table {path} does not match its recorded checksum (truncated or edited): "
                              f"delete {path} and re-run the experiment to recompute it")
        return pd.read_csv(path)

    def write_provenance(self, config: dict, seed: int | None = None, **extra) -> None:
        atomic_write_text(self.dir / "provenance.json",
                          json.dumps(provenance(config=config, seed=seed, **extra), indent=1, default=str))

    def write_json(self, name: str, obj) -> None:
        atomic_write_text(self.dir / f"{name}.json", json.dumps(obj, indent=1, default=float))


def check_writable(path: str | Path) -> None:
    """Fail early (before any work) if results cannot be written under ``path``."""
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not os.access(probe_dir, os.W_OK):
        raise ValueError(f"cannot write results under {path} ({probe_dir} is not writable): pass a writable --out")
