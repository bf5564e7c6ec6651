"""Corpora: documents in, token streams and fixed evaluation windows out.

Sources (``load_documents``):
  * ``"stdlib"``: the Python standard library source of the running interpreter, one document
    per ``.py`` file (no download; differs between Python versions, so every run records
    ``corpus_fingerprint``).
  * a path: a text file, a folder (every text file under it), or a ``.jsonl`` file (one document per
    line, in the ``"text"`` field).
  * ``"hf:<name>[:<split>]"``: a Hugging Face ``datasets`` dataset (needs the network; offline it
    fails fast with a clear message).

Synthetic sources (``RepeatedRandomSource``, ``MarkovSource``) produce token windows directly.

The train/validation split is by a hash of each document's name, so it never changes when files
are added. Documents are encoded literally and joined with a separator token into one stream per
split (``tokenize_stream``: the separator's text inside a document is text, not the token). Evaluation
windows are drawn at random offsets in the validation stream (``eval_windows``), so the t-th
position of a window differs from the first only in how much context precedes it, not in where in a
file it falls (windows aligned to file starts put licences and docstrings first; that confound is
available as ``aligned=True``).

Example:
    >>> train, val = split_documents([("a.py", "x = 1"), ("b.py", "y = 2"), ("c.py", "z = 3")], 0.3)
    >>> len(train) + len(val)
    3
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".java", ".rs", ".go", ".json",
                 ".html", ".css", ".tex", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".sh"}
Document = tuple[str, str]  # (name, text)


class CorpusError(ValueError):
    """A corpus that cannot be used (missing, empty, binary, unreachable)."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(max_files: int | None = None) -> list[Document]:
    """The running interpreter's standard library, one document per ``.py`` file, sorted by path.

    ``site-packages`` is excluded so the corpus does not depend on what is installed."""
    root = stdlib_root()
    paths = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "__pycache__" not in p.parts)
    if not paths:
        raise CorpusError(f"no .py files found under {root}: this interpreter ships no stdlib source; "
                          "pass a folder of text files instead")
    if max_files is not None:
        paths = paths[:max_files]
    docs = []
    for p in paths:
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append((p.relative_to(root).as_posix(), text))
    return docs


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise CorpusError(f"{path} looks binary (it contains NUL bytes): pass text files only")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:  # read anyway, but never silently: the bytes the model sees change
        warnings.warn(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}): its invalid bytes are read as "
                      "U+FFFD; convert it to UTF-8 to train on its text", stacklevel=3)
        return raw.decode("utf-8", errors="replace")


def load_documents(source: str, max_files: int | None = None) -> list[Document]:
    """Documents from ``"stdlib"``, a path (file, folder, ``.jsonl``) or ``"hf:<name>[:<split>]"``."""
    if source == "stdlib":
        return stdlib_documents(max_files)
    if source.startswith("hf:"):
        return _hf_documents(source[3:], max_files)
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"corpus {source!r} does not exist: pass 'stdlib', a text file, a folder, "
                          "a .jsonl file, or 'hf:<dataset name>'")
    if not (path.is_dir() or path.is_file()):  # a FIFO would block forever, a device never ends
        raise CorpusError(f"corpus {source!r} is not a regular file or folder (a named pipe or device?): "
                          "pass a text file, a folder or a .jsonl file")
    if path.is_dir():
        every = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in every if p.suffix.lower() in TEXT_SUFFIXES]  # a.TXT is text as a.txt is
        other = [p.relative_to(path).as_posix() for p in every if p.suffix.lower() not in TEXT_SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if other:
            warnings.warn(f"left out {len(other)} file(s) of {path} whose suffix is not a text suffix "
                          f"({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}); text suffixes: "
                          f"{' '.join(sorted(TEXT_SUFFIXES))}", stacklevel=2)
        if max_files is not None:
            files = files[:max_files]
        docs, skipped = [], []
        for p in files:
            try:
                docs.append((p.relative_to(path).as_posix(), _read_text_file(p)))
            except CorpusError:
                skipped.append(p.name)
        if skipped:
            warnings.warn(f"skipped {len(skipped)} binary file(s) in {path}: {skipped[:5]}", stacklevel=2)
    elif path.suffix == ".jsonl":
        docs = []
        with path.open("rb") as f:
            for i, raw in enumerate(f):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path} line {i + 1} is not valid UTF-8 ({e.reason} at byte {e.start}): "
                                      "fix or remove that line") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path} line {i + 1} is not a JSON object with a 'text' field "
                                      f"({e}); fix or remove that line") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise CorpusError(f"{path} line {i + 1} is not a JSON object with a string 'text' field "
                                      f"(got {type(text).__name__ if isinstance(record, dict) and 'text' in record else 'no text'}); "
                                      "fix or remove that line")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate escape (e.g. "\\ud83d"): no UTF-8 bytes
                    raise CorpusError(f"{path} line {i + 1}: its 'text' holds {e.object[e.start:e.end]!r} at character "
                                      f"{e.start}, a lone surrogate that has no UTF-8 bytes; fix or remove that "
                                      "line") from None
                docs.append((f"{path.name}:{i}", text))
    else:
        docs = [(path.name, _read_text_file(path))]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise CorpusError(f"corpus {source!r} holds no non-empty text documents "
                          f"(looked for suffixes {sorted(TEXT_SUFFIXES)})")
    return docs


def _hf_documents(spec: str, max_files: int | None) -> list[Document]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise CorpusError("'hf:' corpora need the `datasets` package: pip install datasets") from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name, ...
        raise CorpusError(f"could not load the dataset {name!r} ({type(e).__name__}: {e}). Offline? "
                          "Use 'stdlib' or a local folder instead, or set HF_HUB_OFFLINE=1 with a "
                          "cached copy") from None
    if "text" not in ds.column_names:
        raise CorpusError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    n = len(ds) if max_files is None else min(max_files, len(ds))
    return [(f"{name}:{i}", ds[i]["text"]) for i in range(n) if ds[i]["text"].strip()]


def corpus_fingerprint(docs: list[Document], source: str = "") -> dict:
    """Provenance of a corpus: source, interpreter version, document count, bytes, content hash."""
    h = hashlib.sha256()
    n_bytes = 0
    for name, text in docs:
        data = text.encode("utf-8", errors="replace")
        n_bytes += len(data)
        h.update(name.encode())
        h.update(b"\0")
        h.update(data)
        h.update(b"\0")
    return {"source": source, "python": sys.version.split()[0], "n_documents": len(docs),
            "n_bytes": n_bytes, "sha256": h.hexdigest()}


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split: a document is validation iff the hash of its name falls below the fraction."""
    digest = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < val_fraction


def split_documents(docs: list[Document], val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """(train, validation) by hash of document name. Raises if either side ends up empty."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    train = [d for d in docs if not is_validation(d[0], val_fraction)]
    val = [d for d in docs if is_validation(d[0], val_fraction)]
    if not train or not val:
        # Tiny corpora: fall back to the last document (or last half of one) for validation.
        if len(docs) >= 2:
            train, val = docs[:-1], docs[-1:]
        else:
            name, text = docs[0]
            cut = len(text) * 9 // 10
            train, val = [(name, text[:cut])], [(name + ":val", text[cut:])]
    return train, val


# The version of tokenize_stream's output, part of the tokenised-corpus cache key: bumped whenever the
# same documents and tokenizer give other ids, so no cache entry made by older code is read.
# 2: a special token's text inside a document (e.g. "<|endoftext|>") is encoded as text, not as the token.
TOKENIZE_VERSION = 2


def tokenize_stream(docs: list[Document], tokenizer, sep_id: int, progress: bool = False,
                    desc: str = "tokenize") -> tuple[np.ndarray, np.ndarray]:
    """Documents joined by ``sep_id`` into one stream. Returns (ids uint32 (n_tokens,), doc_starts).

    Documents are encoded literally: a special token's text inside one (``<|endoftext|>`` in a file about
    tokenizers) is its characters' tokens; only the separator between documents is ``sep_id``. A pure
    byte tokenizer (id b = byte b, checked on a probe string) takes a fast exact path: the UTF-8 bytes
    themselves. ``progress`` shows a bar (by characters) while encoding: a fresh corpus takes a while."""
    from tqdm.auto import tqdm

    fast = _is_byte_tokenizer(tokenizer)
    encoded = []
    with tqdm(total=sum(len(t) for _, t in docs), desc=desc, unit="char", unit_scale=True,
              disable=not progress) as bar:
        for i in range(0, len(docs), 64):
            chunk = [t for _, t in docs[i:i + 64]]
            if fast:
                encoded += [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in chunk]
            else:
                encoded += tokenizer(chunk, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            bar.update(sum(len(t) for t in chunk))
    parts, starts, offset = [], [], 0
    for ids in encoded:
        starts.append(offset)
        parts.append(np.asarray(ids, dtype=np.uint32))
        parts.append(np.asarray([sep_id], dtype=np.uint32))
        offset += len(ids) + 1
    return np.concatenate(parts), np.asarray(starts, dtype=np.int64)


_BYTE_PROBE = "".join(chr(c) for c in range(1, 600)) + "\u4e2d\U0001f600 end"


def _is_byte_tokenizer(tokenizer) -> bool:
    """True iff ``tokenizer`` maps text to its UTF-8 bytes (id b = byte b)."""
    if getattr(tokenizer, "vocab_size", None) is None or len(tokenizer) != 257:
        return False
    try:
        ids = tokenizer([_BYTE_PROBE], add_special_tokens=False)["input_ids"][0]
    except Exception:
        return False
    return list(ids) == list(_BYTE_PROBE.encode("utf-8"))


@dataclass
class TokenStream:
    """A tokenised split: ids (n_tokens,) and the start offset of each document."""

    ids: np.ndarray
    doc_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class StreamSource:
    """Random windows from train/validation token streams.

    ``train_batch(step, ...)`` is a pure function of (seed, step): resuming at any step replays the
    same data, which is what makes an interrupted run end bit-identical."""

    def __init__(self, train: TokenStream, val: TokenStream):
        self.train, self.val = train, val

    def _check(self, stream: TokenStream, n_ctx: int, what: str):
        if len(stream) <= n_ctx:
            raise CorpusError(f"the {what} stream has {len(stream)} tokens, fewer than one window of "
                              f"{n_ctx + 1}: use a larger corpus or a shorter context")

    def train_batch(self, step: int, batch_size: int, n_ctx: int, seed: int) -> torch.Tensor:
        self._check(self.train, n_ctx, "training")
        g = np.random.default_rng([seed, step])
        starts = g.integers(0, len(self.train) - n_ctx, size=batch_size)
        return torch.from_numpy(np.stack([self.train.ids[s:s + n_ctx] for s in starts]).astype(np.int64))

    def eval_windows(self, n: int, n_ctx: int, seed: int = 0, aligned: bool = False) -> torch.Tensor:
        """A fixed set of ``n`` validation windows (n, n_ctx) at random offsets (or document starts)."""
        self._check(self.val, n_ctx, "validation")
        g = np.random.default_rng([seed, 10**9])
        if aligned:
            ok = self.val.doc_starts[self.val.doc_starts + n_ctx <= len(self.val)]
            if len(ok) == 0:
                raise CorpusError("no validation document start leaves room for a full window")
            starts = g.choice(ok, size=n, replace=len(ok) < n)
        else:
            starts = g.integers(0, len(self.val) - n_ctx, size=n)
        return torch.from_numpy(np.stack([self.val.ids[s:s + n_ctx] for s in starts]).astype(np.int64))


class RepeatedRandomSource:
    """Synthetic: a random token segment (length in ``period``) repeated to fill the window.

    Only in-context copying can predict the repeats, so induction heads form quickly."""

    def __init__(self, vocab_size: int, period: tuple[int, int] = (8, 64), first_id: int = 0):
        if vocab_size - first_id < 2:
            raise ValueError(f"vocab_size={vocab_size} leaves fewer than 2 tokens to draw from")
        self.vocab_size, self.period, self.first_id = vocab_size, period, first_id

    def _sample(self, g: np.random.Generator, batch_size: int, n_ctx: int) -> torch.Tensor:
        out = np.empty((batch_size, n_ctx), dtype=np.int64)
        for b in range(batch_size):
            p = int(g.integers(self.period[0], self.period[1] + 1))
            seg = g.integers(self.first_id, self.vocab_size, size=p)
            out[b] = np.resize(seg, n_ctx)
        return torch.from_numpy(out)

    def train_batch(self, step: int, batch_size: int, n_ctx: int, seed: int) -> torch.Tensor:
        return self._sample(np.random.default_rng([seed, step]), batch_size, n_ctx)

    def eval_windows(self, n: int, n_ctx: int, seed: int = 0, aligned: bool = False) -> torch.Tensor:
        return self._sample(np.random.default_rng([seed, 10**9]), n, n_ctx)


class MarkovSource:
    """Synthetic in-context Markov chains: each sequence has its own random transition matrix
    (rows ~ Dirichlet(concentration)) over ``n_states`` tokens, so only in-context learning of the
    bigram statistics predicts it."""

    def __init__(self, n_states: int, concentration: float = 0.3, first_id: int = 0):
        if n_states < 2:
            raise ValueError(f"n_states={n_states} must be at least 2")
        self.n_states, self.concentration, self.first_id = n_states, concentration, first_id
        self.vocab_size = first_id + n_states

    def _sample(self, g: np.random.Generator, batch_size: int, n_ctx: int) -> torch.Tensor:
        out = np.empty((batch_size, n_ctx), dtype=np.int64)
        for b in range(batch_size):
            trans = g.dirichlet(np.full(self.n_states, self.concentration), size=self.n_states)
            cum = trans.cumsum(axis=1)
            u = g.random(n_ctx)
            s = int(g.integers(self.n_states))
            for t in range(n_ctx):
                out[b, t] = s
                s = min(int(np.searchsorted(cum[s], u[t])), self.n_states - 1)
        return torch.from_numpy(out + self.first_id)

    def train_batch(self, step: int, batch_size: int, n_ctx: int, seed: int) -> torch.Tensor:
        return self._sample(np.random.default_rng([seed, step]), batch_size, n_ctx)

    def eval_windows(self, n: int, n_ctx: int, seed: int = 0, aligned: bool = False) -> torch.Tensor:
        return self._sample(np.random.default_rng([seed, 10**9]), n, n_ctx)
