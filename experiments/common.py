"""Shared plumbing for experiments: result folders, atomic tidy tables, provenance, resumable units.

Every table (CSV), array (``.npy``) and JSON file is written atomically (temp file + rename) and
recorded with its sha256 in the experiment's ``manifest.json``; every read verifies it, so a
truncated or edited file is an error naming the file (and deleting it, as the error says, makes the
next run recompute it). Results that cannot go stale:

* ``res.write(table, df, inputs=...)`` records a fingerprint of the inputs a table was computed from
  (settings, and ``run_fingerprint`` / ``model_fingerprint`` of the checkpoint it came from);
  ``res.has(table, inputs=...)`` is True only for the same inputs, so a unit of work is skipped on a
  re-run only when nothing it depends on changed, and recomputed otherwise.
* ``res.write_provenance(settings)`` refuses (``ResultError``) a folder whose tables were made with
  other settings, so provenance is never rewritten over tables it did not produce; a rerun with the
  same settings keeps the record and appends itself to its ``invocations``, and each table records
  which invocation made it (``res.made_by()``).
* A results root is owned by one process at a time (``owns_results``; OS lock, see
  ``interventions.zoo.ownership``); ``Results`` creates nothing until it writes.
* Stop signals and worker processes: ``experiments.stopping`` (a worker never outlives its parent). A stop
  signal (Ctrl-C, SIGTERM, SIGHUP) received while a file is written waits until the manifest records it.

Example:
    >>> import tempfile, pandas as pd
    >>> with tempfile.TemporaryDirectory() as root:
    ...     res = Results(root, "exp")
    ...     key = {"n_windows": 16, "run": "3f2a"}
    ...     _ = res.write("scores", pd.DataFrame({"x": [1]}), inputs=key)
    ...     res.has("scores", inputs=key), res.has("scores", inputs={**key, "n_windows": 64})
    (True, False)
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from interventions.zoo.ownership import LOCKING, owned, remove_leftovers
from interventions.zoo.provenance import provenance
from interventions.zoo.train import atomic_write_bytes, atomic_write_text, sha256_file

from .stopping import stop_on_signal

SETTINGS_KEY = "__settings__"  # manifest entry: fingerprint and copy of the settings of the tables
_lock_wait = 0.0  # seconds to wait for a results folder another process owns (CLI --wait)


class ResultError(RuntimeError):
    """A result file is missing, truncated, modified, or was made from other inputs."""


class InputError(ValueError):
    """Bad input found by an experiment (a run, a model, an option): the CLI exits with code 2."""


def set_lock_wait(seconds: float) -> None:
    """How long writers wait for a results folder owned by another process (default 0: fail at once)."""
    global _lock_wait
    _lock_wait = float(seconds)


def results_lock(root):
    """The exclusive lock of results folder ``root``, waiting as ``set_lock_wait`` says (a context manager)."""
    return owned(root, _lock_wait, what="results folder")


def owns_results(arg: str = "results_root"):
    """Decorator: hold the exclusive lock of the results root passed as argument ``arg`` for the call."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with results_lock(bound.arguments[arg]):
                return fn(*args, **kwargs)
        return inner
    return wrap


def fingerprint(inputs) -> str:
    """A short stable hash of a JSON-able description of inputs (settings, file hashes)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_fingerprint(run: str | Path) -> str:
    """Content hash of a training run: its config, every verified checkpoint's manifest (which holds
    the sha256 of each checkpoint file) and its saved ``tokenizer/`` where it has one (the head scores
    take their probe tokens from it), so retraining, resuming further or editing changes it."""
    from interventions.zoo.train import list_checkpoints

    run = Path(run)
    parts = [(run / "train_config.json").read_bytes()]
    parts += [c.name.encode() + (c / "manifest.json").read_bytes() for c in list_checkpoints(run)]
    if (run / "tokenizer").is_dir():  # a byte-level run has none: its key is what it always was
        parts.append(b"tokenizer" + _folder_hash(run / "tokenizer").encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def model_fingerprint(spec: str, model=None) -> str:
    """Content hash of what ``survey`` loads from ``spec`` and scores it with. A run: its checkpoints
    (``run_fingerprint``); a model folder: every file in it but hidden ones and documentation (weights,
    configs, tokenizer files of any format: ``merges.txt``, ``tokenizer.model``, ...). For both, also the
    tokenizer folders beside the loaded checkpoint that the scores may read (``scores.tokenizer_folders``:
    its probe tokens and BOS come from the tokenizer). A hub name: the name and the resolved commit."""
    from interventions.analysis.scores import tokenizer_folders
    from interventions.zoo.train import latest_checkpoint

    p = Path(spec)
    if (p / "checkpoints").is_dir():
        key, loaded = run_fingerprint(p), latest_checkpoint(p)
    elif p.is_dir():
        key, loaded = _folder_hash(p), p
    else:
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        return fingerprint({"hub": spec, "commit": commit})
    beside = [f for f in tokenizer_folders(loaded) if f != loaded.resolve()] if loaded is not None else []
    if not beside:
        return key
    return fingerprint([key, *[[os.path.relpath(f, loaded.resolve()), _folder_hash(f)] for f in beside]])


def _folder_hash(folder: Path) -> str:
    """Hash of the names and contents of the files directly in ``folder``, but hidden ones (``.git``,
    ``.gitattributes``) and documentation (``README*``, ``LICENSE*``, ``*.md``), which change no model."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        documentation = f.suffix.lower() == ".md" or f.name.upper().startswith(("README", "LICENSE"))
        if f.is_file() and not f.name.startswith(".") and not documentation:
            h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()[:20]


class Results:
    """One experiment's folder of tidy tables: ``Results(root, "phase_change")``.

    Reading creates nothing; writing creates the folder and holds the root's lock while it writes."""

    def __init__(self, root: str | Path, name: str):
        self.root = Path(root)
        self.dir = self.root / name
        self.manifest_path = self.dir / "manifest.json"

    # -- manifest
    def _manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {}
        try:
            m = json.loads(self.manifest_path.read_text())
            if not isinstance(m, dict) or not all(self._well_formed(k, e) for k, e in m.items()):
                raise ValueError
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ResultError(f"{self.manifest_path} is corrupted: delete the folder {self.dir} and re-run "
                              "the experiment") from None
        return m

    @staticmethod
    def _well_formed(key: str, e) -> bool:
        """A manifest entry as ``_record`` / ``write_provenance`` write it (a bare checksum, or settings without
        the checksum of provenance.json: older manifests)."""
        if isinstance(e, str):
            return key != SETTINGS_KEY
        checksum = e.get("sha256") if isinstance(e, dict) else None
        return (isinstance(e, dict) and (isinstance(checksum, str) or key == SETTINGS_KEY and checksum is None)
                and isinstance(e.get("inputs"), (str, type(None)))
                and (e.get("invocation") is None or type(e.get("invocation")) is int)
                and isinstance(e.get("run"), (str, type(None))))

    @staticmethod
    def _entry(m: dict, key: str) -> dict | None:
        e = m.get(key)
        return {"sha256": e, "inputs": None} if isinstance(e, str) else e  # str: older manifests

    def _record(self, key: str, path: Path, inputs) -> None:
        manifest = self._manifest()
        manifest[key] = {"sha256": sha256_file(path), "inputs": None if inputs is None else fingerprint(inputs),
                         # which of provenance.json's invocations made it (the latest to write provenance)
                         "invocation": (self._entry(manifest, SETTINGS_KEY) or {}).get("invocation")}
        if isinstance(inputs, dict) and isinstance(inputs.get("run"), str):  # the run_fingerprint it came from,
            manifest[key]["run"] = inputs["run"]  # in the clear: tables of one run in other folders are compared
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True))

    def _write_bytes(self, key: str, path: Path, data: bytes, inputs) -> Path:
        with results_lock(self.root):
            self.dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.dir, locked=LOCKING)  # of writes killed mid-way (their writer is gone)
            with stop_on_signal() as deferred, deferred():  # a stop signal waits until the manifest records it
                atomic_write_bytes(path, data)
                self._record(key, path, inputs)
        return path

    def _verified(self, key: str, path: Path, inputs=None, whole_folder: bool = False) -> Path:
        """``path``, checked against its record. ``whole_folder``: a file that rerunning its experiment reads
        before it rewrites it, so the advice for one missing or edited is to delete its record too (the folder)."""
        e = self._entry(self._manifest(), key)
        if whole_folder and e is not None and not path.is_file():
            raise ResultError(f"result {path} is missing though {self.manifest_path} records it: delete the folder "
                              f"{self.dir} and re-run the experiment")
        if e is None or not path.is_file():
            raise ResultError(f"result {path} is missing: run the experiment that writes it first")
        if sha256_file(path) != e["sha256"]:
            raise ResultError(f"result {path} does not match its recorded checksum (truncated or edited): "
                              f"delete {f'the folder {self.dir}' if whole_folder else path} and re-run the "
                              "experiment to recompute it")
        if inputs is not None and e.get("inputs") != fingerprint(inputs):
            raise ResultError(f"result {path} was computed from other inputs than asked for (stale): "
                              f"delete {path} and re-run the experiment to recompute it")
        return path

    def _has(self, key: str, path: Path, inputs=None) -> bool:
        e = self._entry(self._manifest(), key)
        return (e is not None and path.is_file()
                and (inputs is None or e.get("inputs") == fingerprint(inputs)))

    # -- tables
    def has(self, table: str, inputs=None) -> bool:
        """Recorded and present (and, if ``inputs`` is given, computed from the same inputs).
        Use to skip finished units; ``read`` verifies the checksum."""
        return self._has(table, self.dir / f"{table}.csv", inputs)

    def has_all(self, tables, inputs=None) -> bool:
        """``has`` for every table of a unit of work (so deleting any one of them recomputes the unit)."""
        return all(self.has(t, inputs) for t in tables)

    def tables(self) -> list[str]:
        """The names of the files recorded here (tables; arrays and JSON files with their suffix)."""
        return [k for k in self._manifest() if k != SETTINGS_KEY]

    def invocation_of(self, table: str) -> int | None:
        """Which of ``provenance.json``'s invocations wrote the table last (None: not recorded, or by a manifest
        older than invocations)."""
        return (self._entry(self._manifest(), table) or {}).get("invocation")

    def run_of(self, table: str) -> str | None:
        """The ``run_fingerprint`` the table was computed from (its ``inputs``' ``"run"``), None if it records none
        (not keyed on one run, never written, or written before runs were recorded)."""
        return (self._entry(self._manifest(), table) or {}).get("run")

    def write(self, table: str, df: pd.DataFrame, inputs=None) -> Path:
        return self._write_bytes(table, self.dir / f"{table}.csv", df.to_csv(index=False).encode(), inputs)

    def read(self, table: str, inputs=None) -> pd.DataFrame:
        # a model label is read as written: one named "1", "01" or "NA" stays that text (pandas would guess
        # 1.0, 1.0 and NaN, merging two models or losing one); empty cells are NaN as before
        return pd.read_csv(self._verified(table, self.dir / f"{table}.csv", inputs), dtype={"model": str},
                           keep_default_na=False, na_values=[""])

    def read_optional(self, table: str) -> pd.DataFrame | None:
        """The table, or None if it was never written; a damaged or deleted table still raises ``ResultError``
        (one the manifest records but whose file is gone is missing, not never written; one whose file is there
        but that the manifest does not record, as after the manifest was deleted, is unverifiable)."""
        if self._entry(self._manifest(), table) is not None:
            return self.read(table)
        self._refuse_unrecorded(self.dir / f"{table}.csv")
        return None

    def _refuse_unrecorded(self, path: Path) -> None:
        if path.is_file():
            raise ResultError(f"result {path} is not recorded in {self.manifest_path} (deleted or edited): it cannot "
                              f"be verified; delete the folder {self.dir} and re-run the experiment")

    # -- arrays and JSON
    def write_array(self, name: str, array: np.ndarray, inputs=None) -> Path:
        buf = io.BytesIO()
        np.save(buf, np.asarray(array), allow_pickle=False)
        return self._write_bytes(f"{name}.npy", self.dir / f"{name}.npy", buf.getvalue(), inputs)

    def has_array(self, name: str, inputs=None) -> bool:
        return self._has(f"{name}.npy", self.dir / f"{name}.npy", inputs)

    def read_array(self, name: str) -> np.ndarray:
        path = self._verified(f"{name}.npy", self.dir / f"{name}.npy")
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ResultError(f"result {path} is not a readable .npy array ({e}): delete {path} and re-run "
                              "the experiment to recompute it") from None

    def write_json(self, name: str, obj) -> Path:
        data = json.dumps(obj, indent=1, default=float).encode()
        return self._write_bytes(f"{name}.json", self.dir / f"{name}.json", data, None)

    def read_json(self, name: str, default=None):
        """A JSON file written by ``write_json`` (``default`` if never written), checksum verified; one recorded
        whose file is gone, or there but unrecorded, raises ``ResultError`` as in ``read_optional``."""
        path = self.dir / f"{name}.json"
        if self._entry(self._manifest(), f"{name}.json") is None:
            self._refuse_unrecorded(path)
            return default
        return json.loads(self._verified(f"{name}.json", path, whole_folder=True).read_text())

    # -- provenance
    def settings(self) -> dict | None:
        """The settings recorded by ``write_provenance`` (None if never written)."""
        e = self._entry(self._manifest(), SETTINGS_KEY)
        return None if e is None else e.get("settings")

    def write_provenance(self, config: dict, seed: int | None = None, **extra) -> None:
        """Record the settings of this folder's tables and write ``provenance.json``. Refuses
        (ResultError) if the folder already holds tables made with other settings. With the same settings
        the record is kept and this invocation appended to its ``invocations``; the top-level ``extra``
        fields (e.g. the runs evaluated) are this, the latest, invocation's."""
        with results_lock(self.root):
            manifest = self._manifest()
            old = self._entry(manifest, SETTINGS_KEY)
            tables = [k for k in manifest if k != SETTINGS_KEY]
            if old is not None and old.get("inputs") != fingerprint(config) and tables:
                before = old.get("settings") or {}
                diff = sorted(k for k in set(before) | set(config) if before.get(k) != config.get(k)) or "settings"
                raise ResultError(f"{self.dir} holds results made with other settings (differing: {diff}); "
                                  f"they are kept: pass another --out, or delete the folder {self.dir} to "
                                  "recompute them with these settings")
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "provenance.json"
            record = json.loads(json.dumps(provenance(config=config, seed=seed, **extra), default=str))
            this = _invocation(record)
            prior, lost = None, False
            if old is not None and old.get("inputs") == fingerprint(config):
                try:
                    prior = self.read_provenance()
                except ResultError:  # damaged or deleted: rewritten afresh (as its error advises re-running)
                    lost = True
            if prior is not None:  # the same settings again: the record of the tables already here is kept,
                # but its extras (phase_change's runs, survey's models) become this invocation's: the tables over
                # all of them are rewritten from this invocation's (the first's stayed at the top, wrongly)
                record = {**prior, **{k: record[k] for k in extra},
                          "invocations": prior.get("invocations") or [_invocation(prior)]}
            if lost:  # the tables already here keep their invocation numbers, now of unknown invocations: not
                # this one's, which a fresh record would have made their number 0 (credited with their commit)
                used = [(self._entry(manifest, k) or {}).get("invocation") or 0 for k in tables]
                record["invocations"] = [dict(LOST_INVOCATION) for _ in range(max(used, default=-1) + 1)]
            record["invocations"] = record.get("invocations", []) + [this]
            with stop_on_signal() as deferred, deferred():  # a stop signal waits until the manifest records it
                atomic_write_text(path, json.dumps(record, indent=1, default=str))
                manifest[SETTINGS_KEY] = {"sha256": sha256_file(path), "inputs": fingerprint(config),  # read_provenance
                                          "settings": json.loads(json.dumps(config, default=str)),
                                          "invocation": len(record["invocations"]) - 1}
                atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True))

    def made_by(self) -> list[dict]:
        """The invocations (entries of ``provenance.json``'s ``invocations``: git, machine, created,
        versions) that made the tables recorded here, oldest first; tables of folders written before
        invocations were recorded count as the first."""
        prov = self.read_provenance() or {}
        inv = prov.get("invocations") or ([_invocation(prov)] if prov else [])
        manifest = self._manifest()
        used = {(self._entry(manifest, k) or {}).get("invocation") or 0 for k in manifest if k != SETTINGS_KEY}
        return [inv[i] for i in sorted(used) if i < len(inv)]

    def read_provenance(self) -> dict | None:
        """``provenance.json`` (None if never written), verified against the checksum ``write_provenance``
        recorded: an edited, truncated or deleted one is a ``ResultError``, never a wrong or missing machine or
        commit."""
        path = self.dir / "provenance.json"
        e = self._entry(self._manifest(), SETTINGS_KEY) or {}
        if not path.is_file():
            if e.get("sha256") is not None:  # recorded, then deleted: the tables' commit and machine are lost
                raise ResultError(f"{path} is missing though {self.manifest_path} records it: re-run the "
                                  f"experiment that wrote it, or delete the folder {self.dir} and re-run it")
            return None
        try:
            if e.get("sha256") is not None and sha256_file(path) != e["sha256"]:
                raise ValueError
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise ResultError(f"{path} does not match its recorded checksum (truncated or edited): re-run the "
                              f"experiment that wrote it, or delete the folder {self.dir} and re-run it") from None


# An invocation whose record was lost (provenance.json damaged or deleted, then rewritten by a later one)
LOST_INVOCATION = {"git": {"commit": "unknown (provenance.json was damaged, then rewritten)", "dirty": None},
                   "machine": {"platform": "unknown", "threads": "unknown", "cuda": "unknown"}}


def _invocation(record: dict) -> dict:
    """One invocation's entry of a ``provenance.json`` record: all but the settings (config, seed) and the list
    of invocations (a record written before invocations were kept is its own first invocation)."""
    return {k: v for k, v in record.items() if k not in ("config", "seed", "invocations")}


def run_setting(res: Results, run: str | Path) -> str:
    """``run`` as the settings of ``res`` (``write_provenance``) record a run folder: their own spelling when it
    names this same folder (``--out results/default`` after ``--out /abs/path/results/default``, or from another
    working directory: one job, one folder, never "other settings"), else ``str(run)`` (another run folder,
    which ``write_provenance`` refuses over tables it did not make). A recorded folder that no longer exists is
    this one when every table here was computed from this run's content (the folder moved, e.g. with its
    results folder)."""
    old = (res.settings() or {}).get("run")
    try:
        if isinstance(old, str) and os.path.samefile(old, run):
            return old
    except OSError:  # the recorded folder is gone (moved, deleted) or ``run`` does not exist
        if isinstance(old, str) and not os.path.exists(old) and Path(run, "train_config.json").is_file():
            # moved (e.g. the whole results folder renamed): the same run when the tables were made from this
            # content (``run_of``); it was refused as "other settings", advising to delete the finished tables
            made_from = {res.run_of(t) for t in res.tables()} - {None}
            if made_from and made_from == {run_fingerprint(run)}:
                return old
    return str(run)


def made_from_another_run(root: str | Path, folder: str, model: str, tables) -> bool:
    """Whether any of ``tables`` of the experiment folder ``folder`` of run ``model`` (``ablations_<model>``,
    ``circuit_<model>``) was computed from another state of that run than the phase-change tables under
    ``root`` (their recorded ``run_of`` differ: the run retrained, resumed or edited since, or another run
    folder of that name evaluated); False where either records none (tables written before runs were)."""
    evaluated = Results(root, "phase_change").run_of(f"checkpoints_{model}")
    res = Results(root, folder)
    return evaluated is not None and any(res.run_of(t) not in (None, evaluated) for t in tables)


def tables_fingerprint(root: str | Path) -> str:
    """A hash of the recorded checksums of every result under the results root ``root`` (the ``report``
    folder's aside: it holds what is drawn from them; and provenance, which a rerun that recomputes nothing
    extends): equal for the same tables wherever they lie."""
    parts = []
    for manifest in sorted(Path(root).glob("*/manifest.json")):
        if manifest.parent.name != "report":
            m = Results(root, manifest.parent.name)._manifest()
            parts.append([manifest.parent.name, sorted((k, Results._entry(m, k)["sha256"]) for k in m
                                                       if k != SETTINGS_KEY)])
    return fingerprint(parts)


def verify_tables(root: str | Path) -> None:
    """Every table present under the results root ``root`` matches its recorded checksum (``ResultError``
    naming the first that does not, or one its experiment folder's manifest does not record, as after the
    manifest was deleted, or one it records that is gone): commands that draw from tables (``figures``,
    ``report``) check this before they write anything, so a damaged or deleted table never leaves figures half
    redrawn. Arrays (``.npy``) and JSON results are left to their readers (figures and report read none of the
    arrays: tables copied back from another machine may come without them)."""
    root = Path(root)
    for folder in sorted({p.parent for p in [*root.glob("*/manifest.json"), *root.glob("*/provenance.json")]}):
        res = Results(root, folder.name)
        res.read_provenance()
        recorded = res._manifest()
        for path in sorted(folder.glob("*.csv")):
            if path.stem in recorded:
                res._verified(path.stem, path)
            else:
                res._refuse_unrecorded(path)
        for key in sorted(recorded):  # a table the manifest records whose file was deleted: the figures read it
            if key != SETTINGS_KEY and not key.endswith((".npy", ".json")) and not (folder / f"{key}.csv").is_file():
                raise ResultError(f"result {folder / f'{key}.csv'} is missing though {res.manifest_path} records it: "
                                  "re-run the experiment that wrote it to recompute it (or delete the folder "
                                  f"{folder} and re-run it)")


def check_writable(path: str | Path) -> None:
    """Fail early (before any work) if results cannot be written under ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path} is a file, not a folder: pass a folder")
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise InputError(f"--out {path} lies under {probe_dir}, a file, not a folder: pass a writable --out")
    if not os.access(probe_dir, os.W_OK):
        raise InputError(f"cannot write results under {path} ({probe_dir} is not writable): pass a writable --out")
