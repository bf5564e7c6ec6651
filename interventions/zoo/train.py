"""A small, resumable trainer for the attention-only family.

* AdamW with linear warm-up, then a constant learning rate (``schedule="constant"``, the default) or
  cosine decay to ``min_lr_ratio * lr`` (``"cosine"``), gradient clipping.
* Data is a pure function of (seed, step) (see ``corpus.StreamSource``), and checkpoints hold the
  model and optimizer state exactly, so a resumed CPU run ends bit-identical to an uninterrupted one.
* Checkpoints on a log-spaced schedule (``checkpoint_steps``), each a ``save_pretrained`` folder
  (safetensors) plus ``optimizer.safetensors`` and ``manifest.json`` (sha256 of every file). A
  checkpoint is written under a temporary name and renamed, and loaded only if its manifest checks.
* ``metrics.jsonl``: one JSON line per checkpoint: step, tokens, train loss, validation loss,
  learning rate, ICL score, and the loss on the first and the second copy of repeated random tokens.
* Under ``torchrun --nproc_per_node N``: DDP over N processes, each on its rows of the one-process
  batch; rank 0 alone writes the run folder (see ``train`` and ``distributed``).

Example:
    >>> cfg = TrainConfig(model=dict(n_layers=1, n_heads=2, d_model=32, n_ctx=32),
    ...                   corpus="synthetic:repeat", tokens=32 * 8 * 4, batch_size=8, n_checkpoints=3)
    >>> run = train(cfg, out_dir, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import stat
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .model import AttnOnlyConfig, AttnOnlyForCausalLM
from .ownership import LOCKING, remove_leftovers, temp_tag


DEFAULT_N_CTX = 256  # AttnOnlyConfig's default context (read per step: no config object built)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunFolderError(ValueError):
    """The output folder holds a different run, or a checkpoint that cannot be trusted."""


class ConfigError(ValueError):
    """A training option that is unknown, of the wrong type or out of range (see ``parse_config``)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Unknown keys are rejected by ``from_dict``."""

    model: dict = field(default_factory=dict)  # AttnOnlyConfig keyword arguments
    corpus: str = "stdlib"  # see corpus.load_documents; or "synthetic:repeat" / "synthetic:markov"
    vocab_size: int = 257  # tokenizer size; 257 = pure bytes (fast phase change on CPU, see README)
    tokenizer: str | None = None  # an HF tokenizer name/folder instead of training one
    tokens: int = 20_000_000  # total training tokens
    batch_size: int = 16
    lr: float = 1e-3
    warmup_tokens: int = 500_000  # linear warm-up; stabilises the first steps of Adam
    # "constant" after warm-up: every prefix of a run is comparable at equal tokens with any other run
    # of the same lr and warm-up (the paper's small models changed phase right after warm-up);
    # "cosine" decays to min_lr_ratio * lr over this run's own token budget.
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    seed: int = 0
    n_checkpoints: int = 48  # log-spaced; >= 40 resolves a phase change
    # plus one checkpoint every this many tokens (None: log-spaced only)
    checkpoint_every_tokens: int | None = None
    # plus [start_tokens, end_tokens, every_tokens]: dense checkpoints through a transition (None: none)
    dense_checkpoints: list | None = None
    n_eval_windows: int = 64  # fixed validation windows for loss and ICL score
    val_fraction: float = 0.05
    device: str = "cpu"
    max_files: int | None = None  # limit the corpus (tests)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a (JSON, ``--set``) dict: unknown keys at any depth, wrong types and text that
        does not parse as the declared type raise ``ConfigError`` (see ``parse_config``)."""
        return cls(**parse_config(cls, d))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        if d["dense_checkpoints"] is not None:  # as saved in JSON: a tuple would differ from it on --resume
            d["dense_checkpoints"] = list(d["dense_checkpoints"])
        return d

    @property
    def n_ctx(self) -> int:
        return int(self.model["n_ctx"]) if "n_ctx" in self.model else DEFAULT_N_CTX

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.n_ctx))

    def validate(self) -> None:
        check_config(self)  # types (from the annotations), ranges, device, corpus path
        for name in ("tokens", "batch_size", "n_checkpoints", "n_eval_windows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}: choose 'constant' or 'cosine'")
        if self.checkpoint_every_tokens is not None and (not isinstance(self.checkpoint_every_tokens, int)
                                                         or self.checkpoint_every_tokens < 1):
            raise ValueError(f"checkpoint_every_tokens={self.checkpoint_every_tokens!r} must be a positive "
                             "integer or null")
        if self.dense_checkpoints is not None and (
                not isinstance(self.dense_checkpoints, (list, tuple)) or len(self.dense_checkpoints) != 3
                or not all(isinstance(v, int) and v >= 0 for v in self.dense_checkpoints)
                or self.dense_checkpoints[2] < 1 or self.dense_checkpoints[0] > self.dense_checkpoints[1]):
            raise ValueError(f"dense_checkpoints={self.dense_checkpoints!r} must be [start_tokens, end_tokens, "
                             "every_tokens] (non-negative integers, start <= end, every >= 1) or null")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a positive number")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA GPU is available: use --device cpu")
        if (self.corpus not in ("stdlib",) and not self.corpus.startswith(("synthetic:", "hf:"))
                and not Path(self.corpus).exists()):
            from .corpus import CorpusError

            raise CorpusError(f"corpus {self.corpus!r} does not exist: pass 'stdlib', a text file, a folder, "
                              "a .jsonl file, 'hf:<dataset name>' or 'synthetic:repeat'")
        if not self.corpus.startswith("synthetic:") and self.tokenizer is None and self.vocab_size < 257:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for the byte alphabet: byte-level "
                             "tokenizers need at least 257 (256 bytes + separator)")
        if "vocab_size" in self.model and not self.corpus.startswith("synthetic:"):
            raise ValueError("model.vocab_size is set by the tokenizer for text corpora: set vocab_size instead")
        # vocab_size only sizes the tokenizer trained on a text corpus; anywhere else it would be ignored
        if self.vocab_size != TrainConfig.vocab_size and self.corpus.startswith("synthetic:"):
            raise ValueError(f"vocab_size={self.vocab_size} is not used by synthetic corpora (their vocabulary is "
                             "the model's): set model.vocab_size instead")
        if self.vocab_size != TrainConfig.vocab_size and self.tokenizer is not None:
            raise ValueError(f"vocab_size={self.vocab_size} is not used with tokenizer={self.tokenizer!r} (the "
                             "model's vocabulary is that tokenizer's): drop vocab_size")
        AttnOnlyConfig(**self.model)  # raises on bad model options
        if self.corpus.startswith("synthetic:") and int(self.model.get("vocab_size", AttnOnlyConfig().vocab_size)) < 2:
            # build_source's RepeatedRandomSource / MarkovSource refuse it too, after the run folder exists
            raise ValueError(f"model.vocab_size={self.model['vocab_size']} leaves a synthetic corpus fewer than 2 "
                             "tokens to draw from: use model.vocab_size >= 2")
        if self.n_ctx < 4:  # the log's ICL score needs 3 tokens, its induction check two copies of >= 2
            raise ValueError(f"model.n_ctx={self.n_ctx} is too short for the trainer's log (ICL score and "
                             "repeated-token check): use model.n_ctx >= 4")


# ----------------------------------------------------------------------------- config validation
# Derived from the dataclass annotations (and AttnOnlyConfig's signature for ``model.``), so a new
# field is type-checked without touching this code; add a range to ``CONFIG_RANGES`` if it has one.

# name -> (low, low inclusive, high, high inclusive); None = unbounded
CONFIG_RANGES: dict[str, tuple] = {
    "tokens": (0, False, None, False), "batch_size": (0, False, None, False),
    "vocab_size": (0, False, None, False), "n_checkpoints": (0, False, None, False),
    "n_eval_windows": (0, False, None, False), "lr": (0, False, None, False),
    "warmup_tokens": (0, True, None, False), "min_lr_ratio": (0, False, 1, True),
    "weight_decay": (0, True, None, False), "grad_clip": (0, False, None, False),
    "seed": (0, True, 2**63 - 1, True), "val_fraction": (0, False, 1, False),
    "max_files": (0, False, None, False), "betas": (0, True, 1, False),
}
_BOOL_TEXT = {"true": True, "True": True, "1": True, "false": False, "False": False, "0": False}
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"


def _coerce(where: str, tp, value):
    """``value`` as type ``tp`` (an annotation), or ConfigError naming ``where``. Text is accepted only
    for booleans (true/false/True/False/1/0); numbers never come from strings."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(where, a, value)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, args))}"
                              + (f": {_suggest(value, map(str, args))}" if isinstance(value, str) else ""))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value in _BOOL_TEXT:
            return _BOOL_TEXT[value]
        raise ConfigError(f"{where}={value!r} must be a boolean (true/false/True/False/1/0)")
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{where}={value!r} must be a list of {len(args)} values")
        items = args if args and args[-1] is not Ellipsis else [args[0] if args else typing.Any] * len(value)
        return tuple(_coerce(f"{where}[{i}]", a, v) for i, (a, v) in enumerate(zip(items, value)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a group of options (a dict)")
        return value
    return value


def _model_fields() -> dict:
    """AttnOnlyConfig's options and their annotations (from its ``__init__`` signature)."""
    hints = typing.get_type_hints(AttnOnlyConfig.__init__)
    return {n: hints.get(n, typing.Any) for n, p in inspect.signature(AttnOnlyConfig.__init__).parameters.items()
            if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def parse_config(cls, d: dict) -> dict:
    """Keyword arguments for ``cls`` from a dict: unknown keys (at any depth, ``model.`` included)
    are refused with the closest valid name, values parsed to their annotated types."""
    if not isinstance(d, dict):
        raise ConfigError(f"a training config must be a JSON object, not {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in d.items():
        if key not in names:
            raise ConfigError(f"unknown training option {key!r}: {_suggest(key, names)}")
        out[key] = _coerce(key, hints[key], value)
    if "model" in out:
        fields = _model_fields()
        model = {}
        for key, value in out["model"].items():
            if key not in fields:
                raise ConfigError(f"unknown model option 'model.{key}': "
                                  + _suggest(key, fields).replace("'", "'model.", 1))
            model[key] = _coerce(f"model.{key}", fields[key], value)
        out["model"] = model
    return out


def _check_range(where: str, value, bounds: tuple) -> None:
    lo, lo_incl, hi, hi_incl = bounds
    if (lo is not None and (value < lo or (value == lo and not lo_incl))) or (
            hi is not None and (value > hi or (value == hi and not hi_incl))):
        lo_s = "" if lo is None else f"{'>=' if lo_incl else '>'} {lo:g}"
        hi_s = "" if hi is None else f"{'<=' if hi_incl else '<'} {hi:g}"
        rule = "positive (> 0)" if (lo, lo_incl, hi) == (0, False, None) else ' and '.join(s for s in (lo_s, hi_s) if s)
        raise ConfigError(f"{where}={value!r} is out of range: it must be {rule}")


def check_device(device: str, option: str = "device") -> None:
    """A known device (cpu, cuda, cuda:N, mps) that this machine has; else ConfigError naming the fix."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"{option}={device!r} is not a known device: use cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{option}={device!r} was asked for but no CUDA GPU is available: use --device cpu")
        n = torch.cuda.device_count()
        if ":" in device and int(device.split(":")[1]) >= n:
            raise ConfigError(f"{option}={device!r}: this machine has {n} CUDA device(s) (cuda:0-cuda:{n - 1})")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{option}='mps' was asked for but MPS is not available: use --device cpu")


def check_corpus_path(corpus: str) -> None:
    """A corpus that names a path must be an existing regular file or folder (not a FIFO or device)."""
    if corpus in ("stdlib",) or corpus.startswith(("synthetic:", "hf:")):
        return
    if not corpus.strip():
        raise ConfigError("corpus='' is empty: pass 'stdlib', a text file, a folder, a .jsonl file, "
                          "'hf:<dataset name>' or 'synthetic:repeat'")
    from .corpus import CorpusError

    try:
        mode = os.stat(corpus).st_mode
    except FileNotFoundError:
        raise CorpusError(f"corpus {corpus!r} does not exist: pass 'stdlib', a text file, a folder, "
                          "a .jsonl file, 'hf:<dataset name>' or 'synthetic:repeat'") from None
    except OSError as e:
        raise CorpusError(f"corpus {corpus!r} cannot be read ({e.strerror})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a device" if (
            stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "a socket or special file"
        raise CorpusError(f"corpus {corpus!r} is {kind}, not a regular file or folder: pass a text file, "
                          "a folder or a .jsonl file")


def check_config(cfg) -> None:
    """Types (also of a config built directly), ranges, device and corpus path of ``cfg``."""
    hints = typing.get_type_hints(type(cfg))
    fields = _model_fields()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _coerce(f.name, hints[f.name], value) != value or (
                isinstance(value, str) and hints[f.name] is not str and typing.get_origin(hints[f.name]) is not typing.Literal
                and str not in typing.get_args(hints[f.name])):
            raise ConfigError(f"{f.name}={value!r} must be of type {hints[f.name]}")
        if f.name in CONFIG_RANGES and value is not None:
            for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
                _check_range(f.name if not isinstance(value, tuple) else f"{f.name}[{i}]", v, CONFIG_RANGES[f.name])
    for key, value in cfg.model.items():
        if key not in fields:
            raise ConfigError(f"unknown model option 'model.{key}': {_suggest(key, fields)}")
        v = _coerce(f"model.{key}", fields[key], value)
        if v != value or isinstance(value, str) and fields[key] is not str and str not in typing.get_args(fields[key]):
            raise ConfigError(f"model.{key}={value!r} must be of type {fields[key]}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            _check_range(f"model.{key}", v, (0, False, None, False))  # every numeric model option is a size/scale
    check_device(cfg.device)
    check_corpus_path(cfg.corpus)
    if cfg.corpus.startswith("synthetic:") and cfg.corpus not in ("synthetic:repeat", "synthetic:markov"):
        raise ConfigError(f"unknown synthetic corpus {cfg.corpus.split(':', 1)[1]!r}: use synthetic:repeat or "
                          "synthetic:markov")
    try:
        AttnOnlyConfig(**cfg.model)
    except ValueError as e:  # the model's own checks (divisibility, positional kind, ...)
        raise ConfigError(f"model: {e}") from None


def checkpoint_steps(total_steps: int, n: int, every: int | None = None,
                     dense: tuple[int, int, int] | None = None) -> list[int]:
    """``n`` (or fewer, when steps are few) log-spaced steps in [1, total_steps], always incl. the last,
    plus every ``every``-th step when given, plus every ``dense[2]``-th step in [dense[0], dense[1]].

    >>> checkpoint_steps(100, 5), checkpoint_steps(100, 3, every=40), checkpoint_steps(100, 2, dense=(50, 60, 5))
    ([1, 3, 10, 32, 100], [1, 10, 40, 80, 100], [1, 50, 55, 60, 100])
    """
    raw = np.unique(np.round(np.logspace(0, math.log10(total_steps), n)).astype(int))
    extra = set(range(every, total_steps + 1, every)) if every else set()
    if dense:
        extra |= set(range(max(1, dense[0]), min(dense[1], total_steps) + 1, dense[2]))
    return sorted(set(int(s) for s in raw if s >= 1) | extra | {total_steps})


def checkpoint_schedule(cfg: "TrainConfig") -> list[int]:
    """The steps at which ``cfg``'s run writes checkpoints (see ``checkpoint_steps``)."""
    tps = cfg.batch_size * cfg.n_ctx
    every = max(1, cfg.checkpoint_every_tokens // tps) if cfg.checkpoint_every_tokens else None
    dense = None
    if cfg.dense_checkpoints:
        start, end, step = cfg.dense_checkpoints
        dense = (int(math.ceil(start / tps)), end // tps, max(1, step // tps))
    return checkpoint_steps(cfg.total_steps, cfg.n_checkpoints, every, dense)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate used for optimizer step ``step`` (0-based)."""
    warm = max(1, cfg.warmup_tokens // (cfg.batch_size * cfg.n_ctx))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, cfg.total_steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------- checkpoints

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (never leaves a half file; a temporary
    left by a kill is named for ``remove_leftovers``)."""
    tmp = path.with_name(f".{path.name}{temp_tag()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state_keys": {}}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            key = f"{idx}.{k}"
            if torch.is_tensor(v):
                tensors[key] = v.detach().cpu().contiguous()
            else:
                scalars["state_keys"][key] = v
    return tensors, scalars


@contextlib.contextmanager
def os_errors_of_safetensors(path: str | Path | None = None):
    """Re-raise a safetensors failure that reports an OS error ("... No space left on device (os error 28)",
    a ``SafetensorError``, not an ``OSError``) as that ``OSError`` (on ``path``), so a full disk or a
    read-only folder is the environment failure it is (the CLI's one line) and not a traceback; anything
    else passes unchanged.

    >>> from safetensors import SafetensorError
    >>> with os_errors_of_safetensors("run/checkpoints"):
    ...     raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    Traceback (most recent call last):
    ...
    OSError: [Errno 28] No space left on device: 'run/checkpoints'
    """
    try:
        yield
    except Exception as e:
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m is None or isinstance(e, OSError) or not type(e).__module__.startswith("safetensors"):
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), None if path is None else str(path)) from e


def save_checkpoint(run_dir: Path, step: int, model, opt, tokens: int) -> Path:
    """Write checkpoint ``step`` atomically: temp folder, manifest last, then rename."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # HF's per-save "Writing model shards" bar drowns ours
    tensors, scalars = _optimizer_tensors(opt)
    with os_errors_of_safetensors(tmp):
        model.save_pretrained(tmp)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "tokens": tokens, **scalars}))
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
    for p in tmp.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())
    old = ckpt_root / f".old-step-{step:08d}"  # a checkpoint rewritten (a resume from before it) goes aside first:
    if old.exists():  # a kill mid-delete then damages only the hidden old copy, never step-*
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    if old.exists():
        shutil.rmtree(old)
    return final


def verify_checkpoint(path: Path) -> bool:
    """True iff ``path`` has a manifest and every file matches its recorded sha256."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((path / name).is_file() and sha256_file(path / name) == digest for name, digest in files.items())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (half-written ones are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        if verify_checkpoint(path):
            return path
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """All verified checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return [p for p in sorted(root.glob("step-*")) if verify_checkpoint(p)] if root.is_dir() else []


def weight_keys(path: Path) -> dict[str, Path]:
    """Tensor name -> file, read from the headers of a model folder's safetensors weights (no tensor is
    read). Raises ``RunFolderError`` naming a missing or damaged (e.g. truncated) weights file."""
    from safetensors import SafetensorError, safe_open

    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise RunFolderError(f"{path} holds no safetensors weights (model.safetensors)"
                             + (f", only {', '.join(found)}: pickle weights are never loaded (unpickling can run "
                                "code); convert them to safetensors first" if found else "")
                             + ": pass a checkpoint folder written by save_pretrained")
    index = path / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "model.safetensors"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise RunFolderError(f"{index} is not a valid weights index: re-save the model with save_pretrained") from None
    keys = {}
    for name in names:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                keys.update(dict.fromkeys(f.keys(), path / name))
        except (SafetensorError, OSError) as e:
            raise RunFolderError(f"weights file {path / name} is missing or damaged ({str(e).splitlines()[0]}): "
                                 "re-save or re-download the model") from None
    return keys


def load_model(path: str | Path, device: str = "cpu") -> AttnOnlyForCausalLM:
    """Load a checkpoint folder, or a run folder's newest verified checkpoint (safetensors only; the
    manifest is verified when present). A smeared HF model (``smear_keys``, saved with
    ``save_pretrained``) loads smeared, with its saved alphas."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "checkpoints").is_dir():  # a run folder
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise RunFolderError(f"run {path} has no complete checkpoint (none with a verified manifest): train it "
                                 "first, or resume it with `train --resume`")
        path = ckpt
    if not (path / "config.json").is_file():
        raise RunFolderError(f"{path} is not a model folder (no config.json): pass a checkpoint folder "
                             "such as runs/attn-2l/checkpoints/step-00001000, a run folder such as runs/attn-2l (its "
                             "latest checkpoint), or a folder written by save_pretrained")
    if (path / "manifest.json").is_file() and not verify_checkpoint(path):
        raise RunFolderError(f"checkpoint {path} does not match its manifest (half-written or modified): "
                             "delete it and use an earlier checkpoint")
    keys = weight_keys(path)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load drowns the experiment's own
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:  # unreadable config.json, unknown model type, ...
        raise RunFolderError(f"cannot load the model in {path} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                             "pass a checkpoint folder written by save_pretrained") from None
    alphas = [k for k in keys if k.endswith(".key_smear.alpha")]
    # weights from another model: from_pretrained would initialise missing tensors at random, drop extra ones
    bad = {kind: sorted(set(info.get(f"{kind}_keys") or ()) - set(alphas)) for kind in ("missing", "unexpected")}
    if any(bad.values()):
        raise RunFolderError(f"the weights in {path} do not match its config.json ("
                             + "; ".join(f"{kind}: {', '.join(v[:3])}" + (f" and {len(v) - 3} more" if len(v) > 3 else "")
                                         for kind, v in bad.items() if v)
                             + "): re-save the model with save_pretrained")
    if alphas:  # a smeared HF model: from_pretrained builds it plain (its alphas dropped); smear it, load them
        from safetensors import safe_open

        from .smear import smear_keys, smear_modules

        model = smear_keys(model)
        state = {}
        for k in alphas:
            with safe_open(str(keys[k]), framework="pt") as f:
                state[k] = f.get_tensor(k)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected or len(alphas) != len(smear_modules(model)):
            raise RunFolderError(f"the smeared-key alphas in {path} do not match the model's layers: re-save it "
                                 "from the edited model (smear_keys) with save_pretrained")
    return model.to(device).eval()


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> int:
    state = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = v
    for key, v in state["state_keys"].items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return int(state["step"])


# ----------------------------------------------------------------------------- data

def _tokenizer_key(name: str) -> str:
    """The tokenizer's part of the corpus cache key: for a local file or folder its name and the hash of
    every file in it (a tokenizer rewritten in place is a new key), else the hub name as given."""
    path = Path(name)
    if not path.exists():
        return name
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() if f != path else f.name.encode())
        h.update(b"\0" + sha256_file(f).encode())
    return f"{name}|{h.hexdigest()}"


def _publish_cache(tmp: Path, cache: Path) -> None:
    """Move the finished ``tmp`` folder to ``cache``. If another process finished the same entry first
    (it holds ``done``; the key is the content's hash, so it is the same data), keep that one and drop
    ``tmp``: replacing it would delete files that process may be reading."""
    if (cache / "done").is_file():
        shutil.rmtree(tmp)
        return
    if cache.exists():  # an unfinished entry (no "done"): never read, replaced
        shutil.rmtree(cache)
    try:
        os.replace(tmp, cache)
    except OSError:  # another process published between the check and the rename
        if not (cache / "done").is_file():
            raise
        shutil.rmtree(tmp)


def _named_tokenizer(name: str):
    """The ``tokenizer`` option's tokenizer, or ``ConfigError`` naming it where it cannot be loaded (a missing
    folder, one without tokenizer files, a hub name that does not resolve): bad input, not a traceback. An
    OSError with an errno (a disk or permission failure reading the folder) is raised as it is."""
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"tokenizer {name!r} cannot be loaded ({first}): pass a saved tokenizer folder (with "
                          "tokenizer.json or tokenizer_config.json) or, online, a hub name") from None


def build_source(cfg: TrainConfig, run_dir: Path | None = None, cache_dir: Path | None = None,
                 progress: bool = False):
    """(token source, tokenizer or None, corpus fingerprint) for a config. The tokenised corpus is
    cached (``$INTERVENTIONS_CACHE``, default ``~/.cache/interventions``); ``progress`` shows bars
    while a fresh corpus is tokenised."""
    from . import corpus as C

    if cfg.corpus.startswith("synthetic:"):
        kind = cfg.corpus.split(":", 1)[1]
        vocab = int(cfg.model.get("vocab_size", AttnOnlyConfig().vocab_size))
        if kind == "repeat":
            src = C.RepeatedRandomSource(vocab, period=(4, max(5, cfg.n_ctx // 2)))
        elif kind == "markov":
            src = C.MarkovSource(vocab)
        else:
            raise ValueError(f"unknown synthetic corpus {kind!r}: use synthetic:repeat or synthetic:markov")
        return src, None, {"source": cfg.corpus}
    from .tokenizer import load_tokenizer, train_tokenizer

    docs = C.load_documents(cfg.corpus, max_files=cfg.max_files)
    fp = C.corpus_fingerprint(docs, cfg.corpus)
    train_docs, val_docs = C.split_documents(docs, cfg.val_fraction)
    tok_key = _tokenizer_key(cfg.tokenizer) if cfg.tokenizer else f"bpe{cfg.vocab_size}"
    key = f"{fp['sha256']}|{tok_key}|{cfg.val_fraction}|tokenize-v{C.TOKENIZE_VERSION}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("INTERVENTIONS_CACHE", Path.home() / ".cache" / "interventions")) / key
    tok_dir = cache / "tokenizer"
    if (cache / "done").is_file():
        tok = load_tokenizer(str(tok_dir))
    else:
        tok = _named_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(
            (t for _, t in train_docs), cfg.vocab_size)
    if tok.eos_token_id is None:  # id 0 used to join the documents: a real token of some tokenizers
        raise ConfigError(f"tokenizer {cfg.tokenizer!r} has no end-of-text (eos) token to separate the documents "
                          "with: pass a tokenizer that has one (or leave tokenizer unset for a byte-level one)")
    if not (cache / "done").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(cache.parent)  # entries of tokenisations killed mid-way (their writer is gone)
        tmp = cache.parent / f"{cache.name}{temp_tag()}"  # one per writer, named for remove_leftovers
        tmp.mkdir()
        tok.save_pretrained(tmp / "tokenizer")
        sep = tok.eos_token_id
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            ids, starts = C.tokenize_stream(split_docs, tok, sep, progress=progress, desc=f"tokenize {split} corpus")
            np.save(tmp / f"{split}_ids.npy", ids)
            np.save(tmp / f"{split}_starts.npy", starts)
        (tmp / "done").write_text(json.dumps(fp))
        _publish_cache(tmp, cache)
    streams = [C.TokenStream(np.load(cache / f"{s}_ids.npy", allow_pickle=False),
                             np.load(cache / f"{s}_starts.npy", allow_pickle=False)) for s in ("train", "val")]
    fp["n_train_tokens"], fp["n_val_tokens"] = len(streams[0]), len(streams[1])
    return C.StreamSource(*streams), tok, fp


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def quick_eval(model, windows: torch.Tensor, induction_tokens: torch.Tensor, batch_size: int = 16) -> dict:
    """Validation loss, ICL score (late minus early token loss) and repeated-random-token loss.

    Plain forwards (no tracing): this runs at every checkpoint inside the training loop."""
    from ..primitives.loss import loss_from_logits
    from ..analysis.metrics import icl_band, icl_from_losses, icl_indices

    model.eval()
    device = next(model.parameters()).device
    loss = torch.cat([loss_from_logits(model(x).logits, x).cpu()  # (n, pos-1): loss of predicting token t+1
                      for x in windows.to(device).split(batch_size)])
    x = induction_tokens.to(device)
    ind = loss_from_logits(model(x).logits, x).cpu()
    half = x.shape[1] // 2
    model.train()
    finite = bool(torch.isfinite(loss).all())  # else NaN: the divergence guard stops on the validation loss
    return {"val_loss": loss.mean().item(),
            # the experiments' definition (banded; see analysis.metrics), so the log and the report agree
            "icl_score": icl_from_losses(loss, *icl_indices(windows.shape[1]), icl_band(windows.shape[1]))["icl_score"]
            if finite else math.nan,
            "repeat_loss_first": ind[:, : half - 1].mean().item(),
            "repeat_loss_second": ind[:, half:].mean().item()}


# ----------------------------------------------------------------------------- training loop

def _startup_leftover(path: Path) -> bool:
    """A file ``train`` writes before ``train_config.json`` (which marks a started run): a folder holding
    only these was killed at start-up and is reused rather than refused."""
    return path.name in ("provenance.json", "tokenizer", ".write-test", ".lock") or (
        path.name.startswith(".") and ".tmp" in path.name)  # temporaries (the write probe's too)


def config_diff(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """The options (top-level keys) in which the run saved in ``run_dir`` differs from ``cfg``, sorted."""
    saved, want = read_train_config_dict(run_dir), cfg.to_dict()
    return sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))


def _check_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool) -> None:
    cfg_path = run_dir / "train_config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} is a file, not a folder: choose a new or empty --out folder")
    if cfg_path.is_file():
        diff = config_diff(run_dir, cfg)
        if diff:
            if resume and diff == ["lr"]:
                return  # a changed learning rate on resume is allowed (recorded in lr_changes.jsonl)
            raise RunFolderError(f"{run_dir} holds a different run (options differ: {diff}): choose another "
                                 "--out folder, or delete this one")
        if not resume and latest_checkpoint(run_dir) is not None:
            raise RunFolderError(f"{run_dir} already holds checkpoints of this run: pass --resume to "
                                 "continue it, or choose another --out folder")
    elif run_dir.exists() and not all(_startup_leftover(p) for p in run_dir.iterdir()):
        raise RunFolderError(f"{run_dir} is not empty and holds no training run: choose an empty or new "
                             "--out folder")


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_after_steps: int | None = None, wait: float = 0.0, progress_position: int | None = None,
          keep_lr: bool = False) -> Path:
    """Train (or resume) a run in ``run_dir``. Returns the final checkpoint folder.

    The run folder is owned by this call (an OS lock, see ``ownership``): a second process on the same
    folder gets ``FolderBusyError`` naming this one's pid, or waits up to ``wait`` seconds.
    On resume only ``lr`` may differ from the saved config (to continue after divergence): ``cfg.lr`` from
    the checkpoint resumed on (recorded in ``lr_changes.jsonl``), or with ``keep_lr`` the lr the run had at
    that checkpoint (``run_lr``: a lowered one is kept, a change made after it is undone).
    ``stop_after_steps`` ends the process-local loop early (tests of interruption);
    ``progress_position`` is the progress bar's line (parallel runs).

    Under ``torchrun --nproc_per_node N`` (DDP; see ``distributed``) every process runs this call: each
    trains on its ``batch_size / N`` rows of the one-process global batch, gradients are averaged, and
    rank 0 alone takes the lock, writes the folder and evaluates checkpoints; the others wait for it."""
    from .distributed import World
    from .ownership import owned

    cfg.validate()
    _refuse_out_inside_corpus(Path(run_dir), cfg.corpus)
    world = World.from_env()
    world.check_batch(cfg.batch_size)  # before any work: nothing is written
    device = world.device(cfg.device)
    with world.joined(device, wait), contextlib.ExitStack() as held:
        return _train(cfg, run_dir, resume, progress, stop_after_steps,
                      own=lambda: held.enter_context(owned(run_dir, wait, what="run folder")),
                      progress_position=progress_position, world=world, device=device, keep_lr=keep_lr)


def _refuse_out_inside_corpus(run_dir: Path, corpus: str) -> None:
    """RunFolderError (nothing written) when the run folder lies inside a folder corpus: the run's own
    files (train_config.json, tokenizer/*.json, checkpoint manifests) would join the corpus, which then
    differs on every --resume (refused as a changed corpus: the run could never be continued)."""
    if corpus == "stdlib" or corpus.startswith(("synthetic:", "hf:")) or not Path(corpus).is_dir():
        return
    root, out = Path(corpus).resolve(), run_dir.resolve()
    if out == root or root in out.parents:
        raise RunFolderError(f"--out {run_dir} lies inside the corpus folder {corpus}: the run's own files would "
                             "become corpus documents (and the run could never be resumed); choose an --out "
                             "folder outside the corpus")


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool, tok, fingerprint: dict, own,
                     processes: int = 1, keep_lr: bool = False) -> tuple[Path | None, float]:
    """Take the run folder (lock, config, provenance, tokenizer) and return the checkpoint to continue
    from (None: from the start) and the lr to train at (``_settle_lr``); metrics after it are dropped.
    Rank 0 only; this start (``processes``: the DDP world size, and the step it continues from) is
    appended to the provenance's ``invocations``."""
    try:  # mkdir too: a parent that is a regular file or read-only raises OSError here
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test{temp_tag()}"  # before the lock: one name per process, never shared
        try:
            probe.write_text("")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot write to {run_dir} ({e}): choose a writable --out folder") from None
    own()  # from here on no other process writes this folder
    _check_run_dir(run_dir, cfg, resume)  # again: another process may have started it meanwhile
    _check_same_corpus(run_dir, fingerprint, tok)
    if not (run_dir / "train_config.json").is_file():
        from .provenance import provenance

        atomic_write_text(run_dir / "provenance.json", json.dumps(
            provenance(config=cfg.to_dict(), seed=cfg.seed, corpus=fingerprint, invocations=[]), indent=1))
        if (run_dir / "tokenizer").exists():  # left by a start-up killed before train_config.json: maybe
            shutil.rmtree(run_dir / "tokenizer")  # another run's (a synthetic run must not inherit one)
        if tok is not None:
            tok.save_pretrained(run_dir / "tokenizer")
        atomic_write_text(run_dir / "train_config.json", json.dumps(cfg.to_dict()))
    ckpt = resume_point(run_dir, cfg) if resume else _refuse_unverified(run_dir)
    start = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    lr = _settle_lr(run_dir, cfg, start, keep_lr and resume)  # after every refusal: a refused resume writes nothing
    _remove_leftovers(run_dir)
    _record_start(run_dir, cfg, fingerprint, start, processes)
    _truncate_metrics(run_dir / "metrics.jsonl", start if start else -1)
    return ckpt, lr


def _remove_leftovers(run_dir: Path) -> None:
    """Delete the temporaries that writes killed mid-way left in the run folder (called holding its lock).

    Files named with a pid: ``remove_leftovers`` (their writer is provably gone). The checkpoint folders
    ``.tmp-step-N`` carry no pid; they are written only by the holder of the run's lock (``train``), an
    flock the kernel drops when its holder dies, so while this process holds it no other process is
    filling one (not without ``LOCKING``: then they are kept). ``.old-step-N`` (a copy being replaced)
    goes only where ``step-N`` exists: else it is that step's one copy, removed when the step is rewritten. It is
    never renamed back to ``step-N``: a step is rewritten only by a resume from before it, whose metrics line N
    (logged before the save) and lr describe the retrained weights, not that superseded copy."""
    remove_leftovers(run_dir, locked=LOCKING)
    root = run_dir / "checkpoints"
    if not LOCKING or not root.is_dir():
        return
    for p in sorted(root.glob(".tmp-step-*")) + [p for p in sorted(root.glob(".old-step-*"))
                                                  if (root / p.name.replace(".old-", "", 1)).is_dir()]:
        shutil.rmtree(p, ignore_errors=True)


def _record_start(run_dir: Path, cfg: TrainConfig, fingerprint: dict, from_step: int, processes: int) -> None:
    """Append this start of the run (the first, or a ``--resume``) to ``provenance.json``'s ``invocations``:
    when, commit, machine, versions, the step it continues from and its number of processes (a run may be
    resumed under another ``--nproc_per_node``). The top level keeps the first start's record."""
    from .provenance import provenance

    path = run_dir / "provenance.json"
    this = provenance(config=cfg.to_dict(), seed=cfg.seed, from_step=from_step, processes=processes)
    this = {k: v for k, v in this.items() if k not in ("config", "seed")}
    if not path.is_file():  # deleted by hand from a started run: recreated, from this start on
        record = provenance(config=cfg.to_dict(), seed=cfg.seed, corpus=fingerprint, invocations=[])
    else:  # a JSON object: _check_same_corpus has read it
        record = json.loads(path.read_text(encoding="utf-8"))
    if "invocations" not in record:  # written before starts were recorded: the top level is the first start
        record["invocations"] = [{**{k: v for k, v in record.items() if k not in ("config", "seed", "corpus")},
                                  "from_step": 0}]
    record["invocations"].append(this)
    atomic_write_text(path, json.dumps(record, indent=1))


def _check_same_corpus(run_dir: Path, fingerprint: dict, tok=None) -> None:
    """Refuse (RunFolderError, nothing written) to continue a started run whose corpus text or tokenizer
    changed since it started: the same config on other data would silently train (and log) a different
    run. The references are the fingerprint in its ``provenance.json`` and its saved ``tokenizer/``
    (a run without one is not checked for it)."""
    if not (run_dir / "train_config.json").is_file():
        return
    if tok is not None and (run_dir / "tokenizer").is_dir():
        from .tokenizer import load_tokenizer

        if load_tokenizer(str(run_dir / "tokenizer")).backend_tokenizer.to_str() != tok.backend_tokenizer.to_str():
            raise RunFolderError(f"the tokenizer has changed since {run_dir} started (it differs from "
                                 f"{run_dir / 'tokenizer'}): a run continues only on the tokens it started with. "
                                 "Restore that tokenizer, or train into a new --out folder")
    path = run_dir / "provenance.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("corpus") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise RunFolderError(f"{path} is garbled ({e}): restore it, or train into a new --out folder") from None
    if saved.get("sha256") != fingerprint.get("sha256"):
        raise RunFolderError(
            f"the corpus {fingerprint.get('source')!r} has changed since {run_dir} started (content hash "
            f"{str(saved.get('sha256'))[:12]}, {saved.get('n_documents')} documents then; "
            f"{str(fingerprint.get('sha256'))[:12]}, {fingerprint.get('n_documents')} documents now): a run "
            "continues only on the data it started with. Restore that corpus, or train into a new --out folder")


def _train(cfg: TrainConfig, run_dir: str | Path, resume: bool, progress: bool, stop_after_steps: int | None,
           own, progress_position: int | None = None, world=None, device: str | None = None,
           keep_lr: bool = False) -> Path:
    from .distributed import World

    world = world or World()
    device = device or cfg.device
    run_dir = Path(run_dir)
    world.on_rank0(lambda: _check_run_dir(run_dir, cfg, resume))
    # rank 0 first: a text corpus is tokenised into a shared cache by one process, read by the others
    source, tok, fingerprint = world.rank0_first(lambda: build_source(cfg, progress=progress and world.is_main))
    model_kwargs = dict(cfg.model)
    if tok is not None:
        model_kwargs["vocab_size"] = len(tok)
    mcfg = AttnOnlyConfig(**model_kwargs)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = AttnOnlyForCausalLM(mcfg).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, fused=device.startswith("cuda") or None)

    # Rank 0 takes the folder and picks the checkpoint; every rank loads that same checkpoint.
    ckpt, lr = world.on_rank0(lambda: _prepare_run_dir(run_dir, cfg, resume, tok, fingerprint, own, world.size,
                                                       keep_lr))
    cfg = dataclasses.replace(cfg, lr=lr)  # the lr of the steps from here on (the schedule's base)
    start = 0
    if ckpt is not None:
        from safetensors.torch import load_file as load_st

        model.load_state_dict(load_st(str(ckpt / "model.safetensors")))
        start = _load_optimizer(opt, ckpt)
    step_model = model  # what the training step calls: the model itself, or its DDP wrapper
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        cuda = device.startswith("cuda")
        step_model = DistributedDataParallel(model, device_ids=[torch.device(device)] if cuda else None)

    total = cfg.total_steps
    schedule = checkpoint_schedule(cfg)
    windows = source.eval_windows(cfg.n_eval_windows, cfg.n_ctx, seed=cfg.seed)
    # Random tokens for the induction check: printable-ish byte ids for text tokenizers.
    low, high = (0, mcfg.vocab_size) if tok is None else (32, min(mcfg.vocab_size, 127))
    from ..analysis.scores import repeated_random_tokens

    # n_ctx // 2 random ids (with replacement) from [low, high), twice; no BOS
    induction = repeated_random_tokens(torch.arange(low, high), cfg.n_ctx // 2, 2, 16, None, seed=cfg.seed,
                                       distinct=False)
    if start == 0:  # evaluation and writes: rank 0 (on the unwrapped model: no collective inside)
        world.on_rank0(lambda: _log(run_dir, {"step": 0, "tokens": 0, "train_loss": None, "lr": 0.0,
                                              **quick_eval(model, windows, induction)}))

    tokens_per_step = cfg.batch_size * cfg.n_ctx
    rows = world.rows(cfg.batch_size)
    bar = None
    if progress and world.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total * tokens_per_step, initial=start * tokens_per_step, unit="tok",
                   unit_scale=True, desc=run_dir.name, dynamic_ncols=True, position=progress_position)
    recent: list[float] = []
    last_ckpt = ckpt
    for step in range(start, total):
        if stop_after_steps is not None and step - start >= stop_after_steps:
            break
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        # the one-process global batch of this step; this rank keeps its rows (all of them for one process)
        x = source.train_batch(step, cfg.batch_size, cfg.n_ctx, cfg.seed)[rows].to(device)
        logits = step_model(x).logits
        # Mean over this rank's tokens; every rank holds as many, so DDP's average of the ranks'
        # gradients is the gradient of the mean over the global batch (the one-process loss).
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        global_loss = world.mean(loss)  # every rank sees the same value: all stop together on NaN
        if not torch.isfinite(global_loss):
            if bar is not None:
                bar.close()
            raise TrainingDiverged(f"loss became {global_loss.item()} at step {step}; "
                                   + _diverged_advice(last_ckpt))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over ranks here
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        recent.append(global_loss.item())
        done = step + 1
        if bar is not None:
            bar.update(tokens_per_step)
        if done in schedule:
            last_ckpt = world.on_rank0(lambda: _checkpoint(run_dir, model, opt, done, tokens_per_step, recent, lr,
                                                           windows, induction, last_ckpt, bar))
            recent = []
    if bar is not None:
        bar.close()
    return last_ckpt if last_ckpt is not None else run_dir


def _checkpoint(run_dir: Path, model, opt, done: int, tokens_per_step: int, recent: list[float], lr: float,
                windows, induction, last_ckpt: Path | None, bar) -> Path:
    """Evaluate, log and save checkpoint ``done`` (rank 0 only); returns its folder."""
    metrics = {"step": done, "tokens": done * tokens_per_step, "train_loss": float(np.mean(recent)),
               "lr": lr, **quick_eval(model, windows, induction)}
    _guard_checkpoint(model, metrics, last_ckpt, bar)  # never keep a checkpoint that diverged
    # Log first: a kill between the two leaves a line past the last checkpoint, which --resume
    # truncates; the other order would leave a checkpoint whose metrics line is lost for good.
    _log(run_dir, metrics)
    ckpt = save_checkpoint(run_dir, done, model, opt, done * tokens_per_step)
    if bar is not None:
        bar.set_postfix(val=f"{metrics['val_loss']:.3f}", icl=f"{metrics['icl_score']:+.3f}")
    return ckpt


def _log(run_dir: Path, metrics: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _metrics_lines(path: Path) -> tuple[list[dict], str | None]:
    """(valid metric records, note about a dropped torn last line or None) of a metrics.jsonl.

    A last line without its newline that does not parse was torn by a kill mid-write and is dropped
    (its step is recomputed by the resume); any other damaged line raises ``RunFolderError`` naming it."""
    if not path.is_file():
        return [], None
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out, note = [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if ok:
            out.append(rec)
        elif i == len(lines) - 1:  # no newline after it: the write was cut short
            note = f"{path} line {i + 1} was torn (cut short mid-write) and is dropped"
        else:
            raise RunFolderError(
                f"{path} line {i + 1} is damaged (not a JSON metrics line: {line[:40]!r}); nothing was changed. "
                "Delete that line, then run the same command with --resume: training continues from the last "
                "checkpoint whose metrics lines are all present and recomputes the lines after it")
    return out, note


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep metric lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep, _ = _metrics_lines(path)
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in keep if m["step"] <= step))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metric records of a run (``RunFolderError`` naming the file and line if one is damaged)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: run `python -m experiments train ... --resume` on "
                             f"{run_dir} to recompute it")
    records, note = _metrics_lines(path)
    if note:
        raise RunFolderError(f"{note.replace(' and is dropped', '')}: run `python -m experiments train ... "
                             f"--resume` on {run_dir} to recompute it")
    return records


# ----------------------------------------------------------------------------- resume and recovery

def read_train_config_dict(run_dir: str | Path) -> dict:
    """The saved ``train_config.json`` of a run as a dict (``RunFolderError`` naming it if garbled)."""
    path = Path(run_dir) / "train_config.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir} is not a training run folder (no train_config.json): pass a folder "
                             "made by `python -m experiments train`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} is garbled ({e}): restore it, or train into a new --out folder") from None
    if not isinstance(d, dict):
        raise RunFolderError(f"{path} is garbled (not a JSON object): restore it, or train into a new --out folder")
    return d


def load_train_config(run_dir: str | Path) -> TrainConfig:
    """The validated ``TrainConfig`` of a run folder (errors name the file)."""
    try:
        return TrainConfig.from_dict(read_train_config_dict(run_dir))
    except ConfigError as e:
        raise RunFolderError(f"{Path(run_dir) / 'train_config.json'}: {e}") from None


def _refuse_unverified(run_dir: Path) -> None:
    """Refuse (never delete or overwrite) checkpoint folders whose manifest is missing or does not match."""
    root = run_dir / "checkpoints"
    bad = [p.name for p in sorted(root.glob("step-*")) if not verify_checkpoint(p)] if root.is_dir() else []
    if bad:
        good = latest_checkpoint(run_dir)
        raise RunFolderError(
            f"{len(bad)} checkpoint(s) in {root} have no verifiable manifest (missing, or files that do not "
            f"match it): {', '.join(bad)}. They are neither used nor replaced. Move them out of {root} (or delete "
            f"them), then run the same command again to continue from "
            f"{good.name if good else 'the start'}")
    return None


def resume_point(run_dir: Path, cfg: TrainConfig | None = None) -> Path | None:
    """The checkpoint a resume continues from: the newest verified one such that step 0 and every
    checkpoint up to it have their metrics line (so no line is ever lost). Refuses unverifiable
    checkpoints and damaged metrics lines (see ``_refuse_unverified``, ``_metrics_lines``)."""
    _refuse_unverified(run_dir)
    ckpts = list_checkpoints(run_dir)
    records, note = _metrics_lines(run_dir / "metrics.jsonl")
    logged = {m["step"] for m in records}
    chosen = None
    for c in ckpts:
        step = int(c.name.split("-")[1])
        if 0 not in logged or step not in logged:
            break
        chosen = c
    if ckpts and chosen != ckpts[-1]:
        have = [int(c.name.split("-")[1]) for c in ckpts]
        missing = [s for s in [0, *have] if s not in logged]
        print(f"note: {note + '; ' if note else ''}{run_dir / 'metrics.jsonl'} has no line for step(s) "
              f"{missing[:8]}: resuming from {chosen.name if chosen else 'the start'} to recompute them "
              "(the checkpoints and lines after it are rewritten)", file=sys.stderr)
    elif note:
        print(f"note: {note}", file=sys.stderr)
    return chosen


UNDONE = "undone_by_resume_from"  # an lr_changes.jsonl entry whose steps a resume from this step retrained


def read_lr_changes(run_dir: str | Path) -> list[dict]:
    """The entries of a run's ``lr_changes.jsonl``, in the order written ([] if none): ``from_step``,
    ``lr_before``, ``lr``, and ``UNDONE`` on one whose steps a resume from an earlier checkpoint retrained.
    A torn last line (older versions appended: a kill mid-append) is dropped, as that change never took
    effect; a damaged other line raises ``RunFolderError``."""
    path = Path(run_dir) / "lr_changes.jsonl"
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            ok = (isinstance(rec, dict) and type(rec.get("from_step")) is int
                  and all(type(rec.get(k)) in (int, float) and rec[k] > 0 for k in ("lr_before", "lr")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if ok:
            out.append(rec)
        elif i < len(lines) - 1:  # the last line, without its newline, was cut short: never acted on
            raise RunFolderError(f"{path} line {i + 1} is damaged (not an lr change: {line[:40]!r}); nothing was "
                                 "changed. Restore or delete that line, then run the same command again")
    return out


def run_lr(run_dir: str | Path, step: int) -> float:
    """The lr (``TrainConfig.lr``) a run trained at from ``step`` on: the last change at or before ``step``
    not undone (``read_lr_changes``), else the lr it started with (the first change's ``lr_before``, or
    ``train_config.json``'s when it never changed)."""
    return _lr_at(run_dir, read_lr_changes(run_dir), step)


def _lr_at(run_dir: str | Path, changes: list[dict], step: int) -> float:
    """``run_lr`` from the run's ``read_lr_changes`` entries."""
    live = [c["lr"] for c in changes if UNDONE not in c and c["from_step"] <= step]
    return float(live[-1] if live else changes[0]["lr_before"] if changes else
                 read_train_config_dict(run_dir).get("lr", TrainConfig.lr))


def _settle_lr(run_dir: Path, cfg: TrainConfig, start: int, keep: bool) -> float:
    """The lr to train at from step ``start`` on, made the run's record: ``keep`` (a resume naming no lr)
    the one in effect at ``start`` (``run_lr``), else ``cfg.lr`` (a change from ``start``, appended to
    ``lr_changes.jsonl``). Entries after ``start`` are marked ``UNDONE`` (those steps are retrained), then
    ``train_config.json`` gets this lr; each file is written atomically, the log first (it alone says
    which lr each step had: a kill in between leaves a config that the next start corrects)."""
    changes = read_lr_changes(run_dir)
    before = _lr_at(run_dir, changes, start)
    lr = before if keep else cfg.lr
    new = [{**c, UNDONE: start} if UNDONE not in c and c["from_step"] > start else c for c in changes]
    if lr != before:
        new.append({"from_step": start, "lr_before": before, "lr": lr})
    if new != changes:
        atomic_write_text(run_dir / "lr_changes.jsonl", "".join(json.dumps(c) + "\n" for c in new))
    if read_train_config_dict(run_dir).get("lr") != lr:
        atomic_write_text(run_dir / "train_config.json", json.dumps(dataclasses.replace(cfg, lr=lr).to_dict()))
    return lr


def _diverged_advice(last_ckpt: Path | None) -> str:
    if last_ckpt is None:
        return ("no checkpoint was kept. Rerun the same command with --resume --lr <lower> to start again "
                "with a lower learning rate (lr is the one option that may change on --resume)")
    return (f"the last good checkpoint (finite weights and validation loss) is {last_ckpt}. Rerun the same "
            "command with --resume --lr <lower> to continue from it with a lower learning rate (lr is the one "
            "option that may change on --resume)")


def _guard_checkpoint(model, metrics: dict, last_ckpt: Path | None, bar) -> None:
    """Raise TrainingDiverged (before anything is written) if the weights or validation loss are not finite."""
    what = [k for k in ("val_loss", "train_loss") if not math.isfinite(metrics[k])]
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        what.append("weights")
    if what:
        if bar is not None:
            bar.close()
        raise TrainingDiverged(f"at step {metrics['step']} the {' and '.join(what)} are not finite; "
                               + _diverged_advice(last_ckpt))
