"""Input validation matrix: bad inputs through the public API and the CLI.

Every case checks three things: the error type (a ValueError subclass for the API, exit code 2 for
the CLI), that the message names the problem, and that nothing was written or modified (the input
tensors, the model's weights and the folder listing are unchanged).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import interventions as iv
from interventions.analysis.scores import duplicate_token_score, induction_score
from interventions.engine.heads import Head, parse_head, parse_heads
from experiments.__main__ import main as cli_main
from experiments.presets import get_preset
from interventions.zoo import train as T
from interventions.zoo.corpus import (
    CorpusError,
    RepeatedRandomSource,
    load_documents,
    split_documents,
)

REPO = Path(__file__).resolve().parents[1]
V, CTX = 50, 32  # the conftest tiny_model: 2 layers x 4 heads, d_model 32, context 32, vocab 50


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERVENTIONS_CACHE", str(tmp_path / "cache"))


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under ``root``: 'nothing written or changed'."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def good(b=2, p=8) -> torch.Tensor:
    return torch.randint(0, V, (b, p), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- API: tensors and heads

# name -> (call(model, tokens) raising, message fragment). ``tokens`` is a valid (2, 8) batch the
# case may ignore; every input tensor built here is checked unchanged afterwards.
API_CASES = {
    "head 'L1X3'": (lambda m, t: parse_head("L1X3"), "malformed head"),
    "head ''": (lambda m, t: parse_head(""), "malformed head"),
    "head 'L-1H0'": (lambda m, t: parse_head("L-1H0"), "malformed head"),
    "head (1,)": (lambda m, t: parse_head((1,)), "cannot read"),
    "head (1.0, 2)": (lambda m, t: parse_head((1.0, 2)), "cannot read"),
    "no heads": (lambda m, t: parse_heads([]), "no heads"),
    # a Head of non-ints used to pass unchecked: a sweep then said "layer 1 out of range: layers 0-1", a bool
    # layer "no module at 'transformer.h.True': fix the adapter", a float one raised a bare TypeError
    "Head of numpy ints in a sweep": (lambda m, t: iv.ablation_sweep(
        m, t, heads=[Head(np.int64(1), np.int64(0))]), "integer layer and head"),
    "Head with a bool layer": (lambda m, t: iv.per_token_loss(m, t, iv.ZeroAblation(Head(True, 1))),
                               "integer layer and head"),
    "Head with a float layer as receiver": (lambda m, t: iv.path_patch(m, t, t.flip(0), iv.mean_loss_metric,
                                                                      "L0H0", Head(1.0, 0)), "integer layer and head"),
    "head L9H0 (layer out of range)": (lambda m, t: iv.per_token_loss(m, t, iv.ZeroAblation("L9H0")),
                                       "layer 9 out of range"),
    "head L1H7 (head out of range)": (lambda m, t: iv.per_token_loss(m, t, iv.ZeroAblation("L1H7")),
                                      "heads 0-3"),
    "sweep over out-of-range head": (lambda m, t: iv.ablation_sweep(m, t, heads=["L0H0", "L2H0"]),
                                     "layers 0-1"),
    "sweep lists a head twice": (lambda m, t: iv.ablation_sweep(m, t, heads="L0H0,L0H0"), "more than once"),
    "sweep kind unknown": (lambda m, t: iv.ablation_sweep(m, t, kind="bogus"), "kind='bogus' is unknown"),
    "float tokens": (lambda m, t: iv.per_token_loss(m, t.float()), "integer token ids"),
    "1-D tokens": (lambda m, t: iv.per_token_loss(m, t[0]), "batch dimension"),
    "3-D tokens": (lambda m, t: iv.per_token_loss(m, t[None]), "(batch, pos)"),
    "empty batch": (lambda m, t: iv.per_token_loss(m, t[:0]), "empty"),
    "zero positions": (lambda m, t: iv.per_token_loss(m, t[:, :0]), "empty"),
    "list instead of tensor": (lambda m, t: iv.per_token_loss(m, t.tolist()), "torch.LongTensor"),
    "numpy array instead of tensor": (lambda m, t: iv.per_token_loss(m, t.numpy()), "torch.as_tensor(tokens)"),
    "too-long sequence": (lambda m, t: iv.per_token_loss(m, torch.zeros(1, CTX + 1, dtype=torch.long)),
                          f"context of {CTX}"),
    "id = vocab size": (lambda m, t: iv.per_token_loss(m, torch.full((1, 4), V)), "outside the vocabulary"),
    "negative id": (lambda m, t: iv.per_token_loss(m, torch.full((1, 4), -1)), "outside the vocabulary"),
    "batch_size 0": (lambda m, t: iv.per_token_loss(m, t, batch_size=0), "positive integer"),
    "batch_size True": (lambda m, t: iv.per_token_loss(m, t, batch_size=True), "positive integer"),
    "icl_score batch_size True": (lambda m, t: iv.icl_score(m, t, batch_size=True), "positive integer"),
    "icl_score ablation a number": (lambda m, t: iv.icl_score(m, t, ablation=3), "neither an ablation"),
    "icl_share_removed no heads": (lambda m, t: iv.icl_share_removed(m, t, []), "ablation is empty"),
    "icl_share_removed head out of range": (lambda m, t: iv.icl_share_removed(m, t, "L9H0"), "out of range"),
    "icl_share_removed n_boot 0": (lambda m, t: iv.icl_share_removed(m, t, "L1H0", n_boot=0), "n_boot=0"),
    "path_patch reduce=False scalar metric": (lambda m, t: iv.path_patch(
        m, t, t.flip(0), lambda logits, tokens: logits.mean(), "L0H0", "L1H0", reduce=False), "reduce=True"),
    "heads given as a bare int": (lambda m, t: iv.ZeroAblation(1), "cannot read 1 as heads"),
    "cache sites not names": (lambda m, t: iv.run_with_cache(m, t, 3), "sites must be"),
    "resample seed not an int": (lambda m, t: iv.ResampleAblation("L0H0", reference=t, seed=0.5), "seed=0.5"),
    "mean per_position not a bool": (lambda m, t: iv.MeanAblation("L0H0", reference=t, per_position="no"),
                                     "per_position='no'"),
    "tokens on the meta device": (lambda m, t: iv.per_token_loss(m, t.to("meta")), "meta device"),
    "attention_mask on the meta device": (lambda m, t: iv.per_token_loss(
        m, t, attention_mask=torch.ones_like(t, device="meta")), "meta device"),
    "attention_mask with a row of padding only": (lambda m, t: iv.run_with_cache(
        m, t, "L0.z", attention_mask=torch.ones_like(t).index_fill(0, torch.tensor([1]), 0)), "row 1"),
    "function ablation returns integers": (lambda m, t: iv.per_token_loss(
        m, t, iv.FunctionAblation("L0H0", lambda z, head: z.long())), "floating-point"),
    "function ablation returns a meta tensor": (lambda m, t: iv.per_token_loss(
        m, t, iv.FunctionAblation("L0H0", lambda z, head: z.to("meta"))), "meta tensor"),
    "path_patch lists a sender twice": (lambda m, t: iv.path_patch(m, t, t.flip(0), iv.mean_loss_metric,
                                                                 senders=["L0H0", "L0H0"], receivers="L1H0"),
                                         "more than once"),
    "not an ablation": (lambda m, t: iv.run_with_ablations(m, t, ["L0H0"]), "not an ablation"),
    "reference not a tensor": (lambda m, t: iv.MeanAblation("L0H0", reference=[[1, 2]]), "reference must be"),
    "mean reference too short": (lambda m, t: iv.per_token_loss(m, t, iv.MeanAblation("L0H0", reference=t[:, :4])),
                                 "per-position means"),
    "resample reference too short": (lambda m, t: iv.per_token_loss(
        m, t, iv.ResampleAblation("L0H0", reference=t[:, :4])), "at least as long"),
    "reference ids out of vocab": (lambda m, t: iv.per_token_loss(
        m, t, iv.MeanAblation("L0H0", reference=torch.full((2, 8), V + 3))), "reference holds ids outside"),
    "pattern-preserving of a non-ablation": (lambda m, t: iv.PatternPreserving("L0H0"), "wraps one"),
    "patching shape mismatch": (lambda m, t: iv.patch_heads(m, t, t[:, :4], iv.mean_loss_metric),
                                "corrupted has"),
    "patching direction unknown": (lambda m, t: iv.patch_heads(m, t, t, iv.mean_loss_metric,
                                                               direction="sideways"), "direction"),
    "unsupported architecture": (lambda m, t: iv.per_token_loss(torch.nn.Linear(2, 2), t),
                                 "unsupported architecture"),
    "induction score on 2 repeated tokens": (lambda m, t: induction_score(m, seq_len=2, bos_id=0), ">= 3"),
    "prefix matching on 1 repeated token": (lambda m, t: iv.head_scores(m, prefix_tokens=1, seq_len=5, bos_id=0),
                                            "prefix_tokens=1"),  # head_scores' own name (was n_tokens=1)
    "duplicate-token score on 1 token": (lambda m, t: duplicate_token_score(m, seq_len=1, bos_id=0), "seq_len=1"),
    "head_scores batch_size 0": (lambda m, t: iv.head_scores(m, seq_len=5, prefix_tokens=3, bos_id=0, batch_size=0),
                                 "batch_size=0"),
    "inferred probes exclude_top 1.5": (lambda m, t: iv.head_scores(m, seq_len=5, prefix_tokens=3, bos_id=0,
                                                                     exclude_top=1.5), "exclude_top=1.5"),
    "classify threshold as text": (lambda m, t: iv.classify_induction_heads(m, prefix_threshold="0.4"),
                                   "finite number"),
    "model config: d_model not divisible": (lambda m, t: iv.AttnOnlyConfig(n_heads=3, d_model=32),
                                            "divisible"),
    "model config: unknown positional": (lambda m, t: iv.AttnOnlyConfig(positional="bogus"), "positional"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_rejects_bad_input(case, tiny_model):
    """A bad input to the public API raises a ValueError subclass whose message names the problem,
    and leaves the model's weights and the caller's tensors untouched."""
    call, message = API_CASES[case]
    tokens = good()
    before_tokens = tokens.clone()
    before_weights = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        call(tiny_model, tokens)
    assert message in str(e.value), str(e.value)
    assert torch.equal(tokens, before_tokens)
    after = tiny_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before_weights.items())


def test_check_positive_takes_a_minimum_and_numpy_integers():
    """One count check serves the engine (positive) and the ICL share (n_boot >= 2, seed >= 0): numpy
    integers pass and come back as ints, bools and floats are refused, each message names the bound."""
    from interventions.engine.tracing import check_positive

    got = check_positive(np.int64(3), "n_boot", minimum=2)
    assert got == 3 and type(got) is int
    assert check_positive(0, "seed", minimum=0) == 0 and check_positive(None, "b", allow_none=True) is None
    for value, kw, match in ((1, dict(minimum=2), "n=1 must be an integer >= 2"),
                             (True, dict(minimum=0), "n=True must be an integer >= 0"),
                             (-1, dict(minimum=0), "n=-1 must be an integer >= 0"),
                             (0, {}, "n=0 must be a positive integer"),
                             (2.0, dict(allow_none=True), "n=2.0 must be a positive integer or None")):
        with pytest.raises(ValueError, match=match):
            check_positive(value, "n", **kw)


def test_check_positive_says_why_after_its_message():
    """``why`` follows the count message after a colon (the probe lengths, n_ctx, second_copy_loss's length,
    the config's widths and the zoo's seeds keep their reasons while sharing the one check)."""
    from interventions.engine.tracing import check_positive

    with pytest.raises(ValueError, match=r"^n=2 must be an integer >= 3: three tokens at least$"):
        check_positive(2, "n", minimum=3, why="three tokens at least")
    with pytest.raises(ValueError, match=r"^n=True must be a positive integer or None: None is all$"):
        check_positive(True, "n", allow_none=True, why="None is all")
    assert check_positive(np.int64(3), "n", minimum=3, why="unused") == 3


def test_patching_takes_a_numpy_integer_per_pass(tiny_model):
    """heads_per_pass=np.int64(2) (e.g. from a numpy computation) gives what heads_per_pass=2 gives (it
    was refused as not a positive integer, while n_boot accepted numpy integers)."""
    clean = good()
    want = iv.patch_heads(tiny_model, clean, clean.flip(0), iv.mean_loss_metric, heads_per_pass=2, progress=False)
    got = iv.patch_heads(tiny_model, clean, clean.flip(0), iv.mean_loss_metric, heads_per_pass=np.int64(2),
                         progress=False)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------- API: corpora, configs, folders

def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def _attn_folder(root: Path) -> Path:
    folder = root / "model"
    iv.AttnOnlyForCausalLM(iv.AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=16, vocab_size=20)
                           ).save_pretrained(folder)
    return folder


def _bad_manifest(root: Path) -> Path:
    folder = _attn_folder(root)
    (folder / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": "0" * 64}}))
    return folder


def _foreign(root: Path) -> Path:
    folder = root / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    return folder


def _unknown_type(root: Path) -> Path:
    folder = _attn_folder(root)
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_model_xyz"}))
    return folder


def _garbled_config(root: Path) -> Path:
    folder = _attn_folder(root)
    (folder / "config.json").write_text("{not json")
    return folder


def _tc(**over) -> T.TrainConfig:
    d = get_preset("tiny")
    d.update(tokens=2048, n_checkpoints=2)
    d.update(over)
    return T.TrainConfig.from_dict(d)


def _text_and_tokenizer(d):
    from interventions.zoo.tokenizer import byte_tokenizer

    _write(d / "c.txt", "hello world\n" * 50)
    byte_tokenizer().save_pretrained(d / "tok")
    return d


# name -> (setup(tmp) -> argument, call(argument, tmp), error type, message fragment)
FILE_CASES = {
    "corpus: empty text file": (lambda d: _write(d / "empty.txt", "  \n"),
                                lambda a, d: load_documents(str(a)), CorpusError, "no non-empty"),
    "corpus: binary file": (lambda d: _write(d / "blob.txt", b"\x00\x01\x02" * 100),
                            lambda a, d: load_documents(str(a)), CorpusError, "binary"),
    "corpus: empty folder": (lambda d: (d / "docs").mkdir() or d / "docs",
                             lambda a, d: load_documents(str(a)), CorpusError, "no non-empty"),
    "corpus: missing path": (lambda d: d / "nope", lambda a, d: load_documents(str(a)), CorpusError,
                             "does not exist"),
    "corpus: jsonl without text": (lambda d: _write(d / "c.jsonl", '{"txt": "x"}\n'),
                                   lambda a, d: load_documents(str(a)), CorpusError, "line 1"),
    "corpus: val_fraction 0": (lambda d: None, lambda a, d: split_documents([("a", "x")], 0.0), ValueError,
                               "val_fraction"),
    "corpus: synthetic vocab 1": (lambda d: None, lambda a, d: RepeatedRandomSource(1), ValueError,
                                  "fewer than 2"),
    "load: folder without config.json": (lambda d: (d / "m").mkdir() or d / "m",
                                         lambda a, d: T.load_model(a), T.RunFolderError, "no config.json"),
    "load: missing folder": (lambda d: d / "nowhere", lambda a, d: T.load_model(a), T.RunFolderError,
                             "not a model folder"),
    "load: manifest mismatch": (_bad_manifest, lambda a, d: T.load_model(a), T.RunFolderError, "manifest"),
    "load: config of another model, no weights": (_foreign, lambda a, d: T.load_model(a), T.RunFolderError,
                                                  "no safetensors weights"),
    "load: unknown model type": (_unknown_type, lambda a, d: T.load_model(a), T.RunFolderError,
                                 "no_such_model_xyz"),
    "load: garbled config.json": (_garbled_config, lambda a, d: T.load_model(a), T.RunFolderError,
                                  "cannot load"),
    "train: unknown option": (lambda d: None, lambda a, d: T.TrainConfig.from_dict({"epochs": 3}),
                              ValueError, "unknown training option"),
    "train: tokens 0": (lambda d: None, lambda a, d: T.train(_tc(tokens=0), d / "run"), ValueError,
                        "tokens=0"),
    "train: lr nan": (lambda d: None, lambda a, d: T.train(_tc(lr=float("nan")), d / "run"), ValueError,
                      "lr=nan"),
    "train: model.vocab_size with a text corpus": (
        lambda d: _write(d / "c.txt", "hello world\n" * 50),
        lambda a, d: T.train(_tc(corpus=str(a)), d / "run"), ValueError, "model.vocab_size"),
    "train: vocab_size with a synthetic corpus (unused: model.vocab_size sets it)": (
        lambda d: None, lambda a, d: T.train(_tc(vocab_size=64), d / "run"), ValueError, "model.vocab_size"),
    "train: vocab_size with a given tokenizer (unused: the tokenizer sets it)": (
        _text_and_tokenizer,
        lambda a, d: T.train(_tc(corpus=str(a / "c.txt"), tokenizer=str(a / "tok"), vocab_size=1000,
                                 model={"n_layers": 1, "n_heads": 2, "d_model": 16, "n_ctx": 32}), d / "run"),
        ValueError, "tokenizer"),
    "train: bad model option": (lambda d: None, lambda a, d: T.train(_tc(model={"n_layers": 0}), d / "run"),
                                ValueError, "n_layers"),
    "train: unknown synthetic corpus": (lambda d: None, lambda a, d: T.train(_tc(corpus="synthetic:zipf"),
                                                                             d / "run"),
                                        ValueError, "unknown synthetic corpus 'zipf'"),
    "train: out under a regular file": (lambda d: _write(d / "file.txt", "x"),
                                        lambda a, d: T.train(_tc(), a / "sub", progress=False),
                                        T.RunFolderError, "writable"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_api_rejects_bad_files_and_options(case, tmp_path):
    """A bad corpus, checkpoint folder, training option or output folder raises a ValueError subclass
    naming the problem and writes or changes nothing under the working folder."""
    setup, call, error, message = FILE_CASES[case]
    assert issubclass(error, ValueError)
    arg = setup(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error) as e:
        call(arg, tmp_path)
    assert message in str(e.value), str(e.value)
    assert snapshot(tmp_path) == before


def test_pickle_only_checkpoint_is_named(tmp_path):
    """A folder with config.json and only pytorch_model.bin is refused, naming the pickle file."""
    folder = _attn_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    before = snapshot(tmp_path)
    with pytest.raises(T.RunFolderError, match="pytorch_model.bin"):
        T.load_model(folder)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_read_only_out_folder(tmp_path):
    """Training into a folder that cannot be written raises RunFolderError and writes nothing."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(T.RunFolderError, match="writable"):
            T.train(_tc(), ro / "run", progress=False)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- CLI (in process)

def _train(*extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--out", "{tmp}/out", "--tokens", "2048", "--quiet", *extra]


# name -> (argv with {tmp}, setup(tmp), message fragment)
CLI_CASES = {
    "unknown preset": (["train", "--preset", "nope", "--out", "{tmp}/out"], None, "unknown preset"),
    "malformed --set (no =)": (_train("--set", "lr"), None, "not KEY=VALUE"),
    "malformed --set (no key)": (_train("--set", "=3"), None, "not KEY=VALUE"),
    "--set of a bad type": (_train("--set", "n_eval_windows=many"), None, "n_eval_windows='many'"),
    "--tokens 0": (_train("--tokens", "0"), None, "tokens=0"),
    "--tokens not a number": (_train("--tokens", "lots"), None, "invalid int value"),
    "--batch-size 0": (_train("--batch-size", "0"), None, "batch_size=0"),
    # a synthetic corpus of one token: a ValueError traceback from the source, after torch was loaded
    "model.vocab_size=1 on a synthetic corpus": (_train("--set", "model.vocab_size=1"), None,
                                                 "model.vocab_size=1 leaves a synthetic corpus fewer than 2"),
    "--lr negative": (_train("--lr", "-1"), None, "lr=-1"),
    "missing --out": (["train", "--preset", "tiny"], None, "--out"),
    "unknown command": (["fly"], None, "invalid choice"),
    "unknown option": (_train("--epochs", "3"), None, "unrecognized arguments"),
    "empty corpus file": (["train", "--preset", "attn-1l", "--out", "{tmp}/out", "--corpus", "{tmp}/empty.txt"],
                          lambda d: _write(d / "empty.txt", ""), "no non-empty"),
    "binary corpus file": (["train", "--preset", "attn-1l", "--out", "{tmp}/out", "--corpus", "{tmp}/blob.txt"],
                           lambda d: _write(d / "blob.txt", b"\x00\xff" * 64), "binary"),
    "model.vocab_size with a text corpus": (_train("--corpus", "{tmp}/c.txt"),
                                            lambda d: _write(d / "c.txt", "some text\n" * 100),
                                            "model.vocab_size"),
    "out under a regular file": (["train", "--preset", "tiny", "--out", "{tmp}/file.txt/sub", "--tokens", "2048",
                                  "--quiet"], lambda d: _write(d / "file.txt", "x"), "writable"),
    "reproduce --out under a regular file": (["reproduce", "--scale", "tiny", "--out", "{tmp}/file.txt/sub", "--quiet"],
                                             lambda d: _write(d / "file.txt", "x"), "writable"),
    "out is a non-empty foreign folder": (_train(), lambda d: _write(d / "out" / "notes.txt", "mine"),
                                          "not empty"),
    "figures from a folder without tables": (["figures", "--results", "{tmp}/res", "--out", "{tmp}/figs"], None,
                                             "run `python -m experiments reproduce --out {tmp}/res` first"),
    # a folder with a space: the suggested command is quoted (it was `... --out /tmp/my res`, two arguments)
    "figures from a folder with a space, without tables": (["figures", "--results", "{tmp}/my res", "--out",
                                                            "{tmp}/figs"], None, "reproduce --out '{tmp}/my res'` first"),
    "ablations before phase-change, --out with a space": (["ablations", "{tmp}/run", "--out", "{tmp}/my out"],
                                                          lambda d: _write(d / "run" / "train_config.json", "{}"),
                                                          "`phase-change {tmp}/run --out '{tmp}/my out'` first"),
    # a mistyped model folder was looked up on the hub (a network wait, then "could not resolve ... on the hub")
    "survey of a model folder that does not exist": (["survey", "{tmp}/runs/atn-2l", "--out", "{tmp}/sv"], None,
                                                    "'{tmp}/runs/atn-2l': no such folder"),
    # README "Corpus": --set tokenizer=<hub name or folder>; one that cannot be loaded is bad input (it was a
    # transformers traceback: OSError for a missing folder, ValueError for a folder without tokenizer files)
    "tokenizer: a missing folder": (["train", "--preset", "attn-1l", "--out", "{tmp}/out", "--corpus", "{tmp}/c.txt",
                                     "--set", "tokenizer={tmp}/nowhere", "--quiet"],
                                    lambda d: _write(d / "c.txt", "some text\n" * 100), "tokenizer '{tmp}/nowhere'"),
    "tokenizer: a folder without tokenizer files": (["train", "--preset", "attn-1l", "--out", "{tmp}/out", "--corpus",
                                                     "{tmp}/c.txt", "--set", "tokenizer={tmp}/tok", "--quiet"],
                                                    lambda d: _write(d / "c.txt", "some text\n" * 100)
                                                    and _write(d / "tok" / "notes.txt", "not a tokenizer"),
                                                    "tokenizer '{tmp}/tok'"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_usage_error_exits_2(case, tmp_path, capsys):
    """A CLI usage error exits with code 2, says what is wrong on stderr, and writes nothing."""
    argv, setup, message = CLI_CASES[case]
    if setup is not None:
        setup(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message.format(tmp=tmp_path) in err, err
    assert snapshot(tmp_path) == before


def test_cli_resume_of_a_different_run_exits_2(tmp_path, capsys):
    """`--resume` on a folder holding a different run (another seed) exits 2, naming the differing
    option, and leaves the run's files byte-identical."""
    run = tmp_path / "out"
    argv = ["train", "--preset", "tiny", "--out", str(run), "--tokens", "2048", "--quiet"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main([*argv, "--seed", "1", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "different run" in err and "seed" in err, err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- CLI (real subprocesses)

@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "tiny", "--out", "{tmp}/f.txt/sub", "--tokens", "2048", "--quiet"], "writable"),
    (["train", "--preset", "tiny", "--out", "{tmp}/out", "--set", "model.d_model"], "not KEY=VALUE"),
    (["reproduce", "--scale", "tiny", "--out", "{tmp}/f.txt/sub", "--quiet"], "writable"),
])
def test_cli_subprocess_exit_code_2(tmp_path, argv, message):
    """Through a real `python -m experiments` process: exit status 2, the problem on stderr, no
    traceback, nothing written."""
    (tmp_path / "f.txt").write_text("x")
    before = snapshot(tmp_path)
    res = subprocess.run([sys.executable, "-m", "experiments", *[a.format(tmp=tmp_path) for a in argv]],
                         check=False, capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert snapshot(tmp_path) == before


def test_progress_defaults_to_a_bar_only_for_long_work(monkeypatch):
    """The sweep and the patching functions default to progress=None: a tqdm bar that appears only after
    AUTO_DELAY_S seconds (a quick call prints nothing; a long one is never silent); True shows it at once,
    False makes none; any other value is refused before any run."""
    import tqdm.auto

    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, ablation_sweep, mean_loss_metric
    from interventions.primitives import progress as P
    from interventions.primitives.patching import patch_heads, path_patch

    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
    clean, corrupted = torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 6))
    made = []
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        made.append(kwargs.get("delay"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    calls = {"sweep": lambda **kw: ablation_sweep(model, clean, **kw),
             "patch_heads": lambda **kw: patch_heads(model, clean, corrupted, mean_loss_metric, **kw),
             "path_patch": lambda **kw: path_patch(model, clean, corrupted, mean_loss_metric, "L0H0", "L1H1", **kw)}
    for name, call in calls.items():
        for progress, delays in ((None, [P.AUTO_DELAY_S]), (True, [0]), (False, [])):
            made.clear()
            call() if progress is None else call(progress=progress)
            assert made == delays, (name, progress, made)
        made.clear()
        with pytest.raises(ValueError, match="progress='yes' must be True, False or None"):
            call(progress="yes")
        assert made == []
