"""Corpora, tokenizer and evaluation windows."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from interventions.zoo import corpus as C
from interventions.zoo.tokenizer import byte_tokenizer, train_tokenizer


def test_stdlib_corpus_and_fingerprint():
    """The stdlib corpus loads; its fingerprint names the interpreter and is stable."""
    docs = C.stdlib_documents(max_files=20)
    assert len(docs) > 10 and all(name.endswith(".py") for name, _ in docs)
    fp1, fp2 = C.corpus_fingerprint(docs, "stdlib"), C.corpus_fingerprint(docs, "stdlib")
    assert fp1 == fp2 and fp1["python"].count(".") == 2 and len(fp1["sha256"]) == 64
    assert C.corpus_fingerprint(docs[:-1])["sha256"] != fp1["sha256"]


def test_split_is_by_name_and_deterministic():
    """A document's side of the split depends only on its name, not on the other documents."""
    docs = [(f"f{i}.py", "x") for i in range(400)]
    train, val = C.split_documents(docs, 0.1)
    assert 10 < len(val) < 80 and len(train) + len(val) == 400
    _, val_sub = C.split_documents(docs[::2], 0.1)
    assert {n for n, _ in val_sub} == {n for n, _ in val} & {n for n, _ in docs[::2]}


def test_local_sources(tmp_path):
    """Text files, folders and JSONL load; empty, binary and malformed inputs raise CorpusError."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    (tmp_path / "d" / "b.py").write_text("print(1)")
    assert len(C.load_documents(str(tmp_path / "d"))) == 2
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert [t for _, t in C.load_documents(str(tmp_path / "c.jsonl"))] == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"nottext": 1}\n')
    with pytest.raises(C.CorpusError, match="line 1"):
        C.load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CorpusError, match="no non-empty"):
        C.load_documents(str(tmp_path / "empty"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(C.CorpusError, match="binary"):
        C.load_documents(str(tmp_path / "bin.txt"))
    with pytest.raises(C.CorpusError, match="does not exist"):
        C.load_documents(str(tmp_path / "nope"))


def test_hf_dataset_offline_fails_fast(monkeypatch):
    """An hf: corpus offline raises a CorpusError that points to local alternatives."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(C.CorpusError, match="Offline"):
        C.load_documents("hf:surely-not-a-real-dataset-xyz")


def test_byte_tokenizer_roundtrip_and_bpe():
    """Pure bytes: id = byte value, 257 ids, lossless; a BPE adds merges up to the size asked."""
    tok = byte_tokenizer()
    text = "def f(x):\n    return x  # é\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode()) and tok.decode(ids) == text and len(tok) == 257
    bpe = train_tokenizer(["def f(x): return x\n" * 50, "class A: pass\n" * 50], vocab_size=300)
    assert 257 < len(bpe) <= 300 and bpe.decode(bpe(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="byte alphabet"):
        train_tokenizer(["x"], vocab_size=100)


def test_train_tokenizer_takes_numpy_sizes_and_refuses_bools():
    """A numpy integer is a size like any int (it was reported as "too small"); a bool is not a size."""
    texts = ["def f(x): return x\n" * 50, "class A: pass\n" * 50]
    assert len(train_tokenizer(texts, vocab_size=np.int64(300))) == len(train_tokenizer(texts, vocab_size=300))
    assert len(train_tokenizer(texts, vocab_size=np.int32(257))) == 257
    for bad in (True, 256.0, "300"):
        with pytest.raises(ValueError, match="vocab_size"):
            train_tokenizer(texts, vocab_size=bad)


def test_eval_windows_random_offsets_seeded():
    """Windows are seeded, full length, and (unless aligned) not at document starts."""
    docs = [(f"f{i}.py", "abcdefghij" * 30) for i in range(20)]
    tok = byte_tokenizer()
    ids, starts = C.tokenize_stream(docs, tok, 256)
    src = C.StreamSource(C.TokenStream(ids, starts), C.TokenStream(ids, starts))
    w1, w2 = src.eval_windows(32, 64, seed=3), src.eval_windows(32, 64, seed=3)
    assert w1.shape == (32, 64) and torch.equal(w1, w2)
    assert not torch.equal(w1, src.eval_windows(32, 64, seed=4))
    first = set(w1[:, 0].tolist())
    aligned = src.eval_windows(32, 64, seed=3, aligned=True)
    assert set(aligned[:, 0].tolist()) == {ord("a")}  # every aligned window starts a document
    assert len(first) > 3  # random offsets start anywhere
    # training batches are a pure function of (seed, step)
    assert torch.equal(src.train_batch(5, 4, 64, 0), src.train_batch(5, 4, 64, 0))
    assert not torch.equal(src.train_batch(5, 4, 64, 0), src.train_batch(6, 4, 64, 0))


def test_synthetic_sources():
    """Repeated random tokens repeat with their period; Markov chains follow a per-sequence matrix."""
    rep = C.RepeatedRandomSource(50, period=(5, 5))
    x = rep.train_batch(0, 3, 20, 0)
    assert torch.equal(x[:, :5], x[:, 5:10])
    mk = C.MarkovSource(n_states=4)
    y = mk.train_batch(0, 8, 200, 0)
    assert y.min() >= 0 and y.max() < 4
    # Different sequences have different transition statistics (in-context only).
    counts = [np.bincount((s[:-1] * 4 + s[1:]).numpy(), minlength=16) for s in y]
    assert not all(np.array_equal(counts[0] > 0, c > 0) for c in counts[1:])


def test_byte_fast_path_equals_the_tokenizer():
    """The pure-byte fast path of tokenize_stream gives the UTF-8 bytes of each document (incl. non-ASCII
    text and a document holding the separator's text), which is the HF tokenizer's literal encoding."""
    from interventions.zoo.tokenizer import SEP, byte_tokenizer

    tok = byte_tokenizer()
    docs = [("a.py", "def f():\n    return 'é中😀'\n"), ("b.py", "x = 1" + SEP + "y"), ("c.py", "\t\x00\x7f ÿ")]
    assert C._is_byte_tokenizer(tok)
    ids, starts = C.tokenize_stream(docs, tok, 256)
    data = [list(t.encode("utf-8")) for _, t in docs]
    assert ids.tolist() == [i for d in data for i in d + [256]]
    assert starts.tolist() == [0, len(data[0]) + 1, len(data[0]) + len(data[1]) + 2]
    literal = tok([t for _, t in docs], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert literal == data


def _separator_corpus(folder: Path) -> list:
    """A folder corpus whose files hold the separator's text (as a file about tokenizers would)."""
    from interventions.zoo.tokenizer import SEP

    folder.mkdir()
    (folder / "a.txt").write_text(f"GPT-2 ends a document with {SEP} and starts the next one.\n" * 20)
    (folder / "b.md").write_text(SEP + "starts this file, ends it" + SEP)
    (folder / "c.py").write_text("x = 1\n" * 30)
    return C.load_documents(str(folder))


@pytest.mark.parametrize("path", ["byte fast path", "byte tokenizer, generic path", "bpe"])
def test_separator_text_inside_a_document_is_encoded_literally(tmp_path, monkeypatch, path):
    """Only the separator between documents is the special token: ``<|endoftext|>`` inside a file is
    encoded as its characters, on the byte fast path and through the tokenizer (byte-level and BPE).
    Checked by decoding each document's ids back to its text (bytes for the byte tokenizer)."""
    docs = _separator_corpus(tmp_path / "corpus")
    tok = byte_tokenizer() if path.startswith("byte") else train_tokenizer([t for _, t in docs], vocab_size=300)
    sep = tok.eos_token_id
    assert C._is_byte_tokenizer(tok) == (path != "bpe")
    if path == "byte tokenizer, generic path":
        monkeypatch.setattr(C, "_is_byte_tokenizer", lambda tokenizer: False)
    ids, starts = C.tokenize_stream(docs, tok, sep)
    assert (ids == sep).sum() == len(docs) and ids[-1] == sep  # the separators between documents, no more
    ends = [*starts[1:], len(ids)]
    for (_, text), a, b in zip(docs, starts, ends):
        doc = ids[a:b - 1].tolist()
        decoded = bytes(doc).decode("utf-8") if path.startswith("byte") else tok.decode(doc)
        assert decoded == text and sep not in doc


def test_packed_stdlib_reads_back_as_the_same_documents(tmp_path):
    """pack_corpus: the archive, unpacked, is a folder corpus with exactly the stdlib's documents."""
    import tarfile

    from experiments.pack_corpus import pack_corpus
    from interventions.zoo.corpus import load_documents, stdlib_documents

    path = pack_corpus(tmp_path / "c.tgz", max_files=40)
    with tarfile.open(path) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    assert load_documents(str(tmp_path / "x" / "stdlib")) == stdlib_documents(40)


def test_pack_corpus_cli_help_and_usage_write_nothing(tmp_path):
    """`python -m experiments.pack_corpus --help` prints usage (it used to write a 6 MB archive named
    `--help`); a missing or extra argument, or an existing folder as the archive (it packed the corpus,
    then raised IsADirectoryError leaving `DIR.tmp`), exits 2; nothing is written."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for args, rc in ((["--help"], 0), ([], 2), (["-x"], 2), (["a.tgz", "b.tgz"], 2)):
        r = subprocess.run([sys.executable, "-m", "experiments.pack_corpus", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == rc, (args, r.stdout, r.stderr)
        assert "usage:" in (r.stdout + r.stderr)
        assert list(tmp_path.iterdir()) == [], args
    (tmp_path / "dir").mkdir()
    r = subprocess.run([sys.executable, "-m", "experiments.pack_corpus", "dir"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is a folder" in r.stderr, (r.stdout, r.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir"]


def test_non_utf8_text_is_never_changed_silently(tmp_path):
    """A text file that is not UTF-8 (Latin-1 here) has its bytes read as U+FFFD, which changes the bytes
    the model trains on: it warns naming the file (a folder: each such file). A JSONL 'text' holding a lone
    surrogate escape (no UTF-8 bytes) is a CorpusError naming the line, not a traceback in tokenisation."""
    (tmp_path / "lat.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"lat\.txt is not valid UTF-8.*U\+FFFD"):
        assert C.load_documents(str(tmp_path / "lat.txt"))[0][1] == "caf\ufffd na\ufffdve"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.txt").write_text("fine text")
    (tmp_path / "d" / "lat.txt").write_bytes("r\xe9sum\xe9".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"lat\.txt is not valid UTF-8"):
        assert len(C.load_documents(str(tmp_path / "d"))) == 2
    import warnings

    with warnings.catch_warnings():  # valid UTF-8 (non-ASCII included): no warning
        warnings.simplefilter("error")
        (tmp_path / "d" / "lat.txt").write_text("r\xe9sum\xe9 \u4e2d", encoding="utf-8")
        assert C.load_documents(str(tmp_path / "d"))[0][1] == "r\xe9sum\xe9 \u4e2d"
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "abc \\ud83d def"}\n')
    with pytest.raises(C.CorpusError, match="line 2.*surrogate"):
        C.load_documents(str(tmp_path / "s.jsonl"))


def test_folder_suffixes_are_case_insensitive_and_left_out_files_are_named(tmp_path):
    """A folder's ``A.TXT`` is read as ``a.txt`` is; files of other suffixes are left out with a warning
    naming them (hidden files and folders silently)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    (tmp_path / "d" / "B.TXT").write_text("upper")
    (tmp_path / "d" / "data.csv").write_text("1,2")
    (tmp_path / "d" / ".hidden").write_text("x")
    with pytest.warns(UserWarning, match=r"left out 1 file.*data\.csv"):
        docs = C.load_documents(str(tmp_path / "d"))
    assert sorted(n for n, _ in docs) == ["B.TXT", "a.txt"]
