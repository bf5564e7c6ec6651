"""Trainer: checkpoints, bit-identical resume, run-folder safety, NaN guard, CLI errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.presets import get_preset
from interventions.zoo import train as T


def tiny_cfg(**over):
    d = get_preset("tiny")
    d.update(tokens=64 * 8 * 12, n_checkpoints=5)
    d.update(over)
    return T.TrainConfig.from_dict(d)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERVENTIONS_CACHE", str(tmp_path / "cache"))


def test_checkpoint_schedule_log_spaced():
    """At least 40 distinct checkpoints for a long run, log-spaced, ending at the last step."""
    steps = T.checkpoint_steps(10_000, 48)
    assert len(steps) >= 40 and steps[-1] == 10_000 and steps[0] == 1
    assert steps[1] - steps[0] < steps[-1] - steps[-2]


def test_resume_is_bit_identical(tmp_path):
    """An interrupted run resumed from its last checkpoint ends with byte-identical weights."""
    cfg = tiny_cfg()
    T.train(cfg, tmp_path / "a", progress=False)
    T.train(cfg, tmp_path / "b", progress=False, stop_after_steps=3)  # of 6: stopped mid-run
    assert T.latest_checkpoint(tmp_path / "b").name == "step-00000002"
    T.train(cfg, tmp_path / "b", progress=False, resume=True)
    a = (tmp_path / "a/checkpoints").glob("step-*")
    last = max(a)
    other = tmp_path / "b/checkpoints" / last.name
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (last / name).read_bytes() == (other / name).read_bytes()
    assert T.read_metrics(tmp_path / "a") == T.read_metrics(tmp_path / "b")


def test_half_written_checkpoint_is_skipped(tmp_path):
    """A checkpoint whose files do not match its manifest is never loaded."""
    cfg = tiny_cfg()
    T.train(cfg, tmp_path / "r", progress=False)
    ckpts = sorted((tmp_path / "r/checkpoints").glob("step-*"))
    with open(ckpts[-1] / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert T.latest_checkpoint(tmp_path / "r") == ckpts[-2]
    with pytest.raises(T.RunFolderError, match="manifest"):
        T.load_model(ckpts[-1])


def test_run_folder_conflicts(tmp_path):
    """A folder holding a different run, or an unrelated non-empty folder, is refused untouched."""
    cfg = tiny_cfg()
    T.train(cfg, tmp_path / "r", progress=False)
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    with pytest.raises(T.RunFolderError, match="different run"):
        T.train(tiny_cfg(seed=1), tmp_path / "r", progress=False)
    with pytest.raises(T.RunFolderError, match="--resume"):
        T.train(cfg, tmp_path / "r", progress=False)
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(T.RunFolderError, match="not empty"):
        T.train(cfg, tmp_path / "other", progress=False)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    """A non-finite loss stops training with a message; the last good checkpoint remains valid."""
    cfg = tiny_cfg()
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def flaky(*a, **k):  # the training loss (the only cross_entropy call in the loop) turns NaN at step 4
        out = real(*a, **k)
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 3 else out

    monkeypatch.setattr(T.F, "cross_entropy", flaky)
    with pytest.raises(T.TrainingDiverged, match="last good checkpoint"):
        T.train(cfg, tmp_path / "r", progress=False)
    assert T.latest_checkpoint(tmp_path / "r") is not None


def test_training_learns_repeats(tmp_path):
    """On repeated random tokens a 2-layer model learns to copy: second-copy loss drops well below
    the first copy's (an induction check that cannot pass without in-context copying)."""
    d = get_preset("tiny")
    T.train(T.TrainConfig.from_dict(d), tmp_path / "r", progress=False)
    last = T.read_metrics(tmp_path / "r")[-1]
    assert last["repeat_loss_second"] < 0.5 * last["repeat_loss_first"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "nope", "--out", "{tmp}/x"], "unknown preset"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--corpus", "{tmp}/missing"], "does not exist"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--set", "model.d_model=31"], "divisible"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--set", "bogus=1"], "unknown training option"),
    (["train", "--preset", "attn-2l", "--out", "{tmp}/x", "--set", "vocab_size=100"], "byte alphabet"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--device", "cuda"], "no CUDA"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--set", "model.n_ctx=0"], "positive"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--set", "lr=0.5", "--lr", "0.01"], "given twice"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--tokens", "5000", "--set", "tokens=9000"], "given twice"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    """Bad CLI input exits with code 2, a message naming the problem, and no output folder."""
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert not (tmp_path / "x").exists()


def test_cli_train_and_resume(tmp_path):
    """`train` runs a preset end to end and prints its final metrics; --resume of a finished run is a no-op."""
    res = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--quiet", "--tokens", "5000")
    assert res.returncode == 0, res.stderr
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["tokens"] > 0 and "val_loss" in final
    res = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--quiet", "--tokens", "5000", "--resume")
    assert res.returncode == 0 and json.loads(res.stdout.strip().splitlines()[-1])["step"] == final["step"]


def test_load_model_accepts_a_run_folder(tmp_path):
    """A run folder loads its newest verified checkpoint (the same weights as loading that checkpoint);
    a run with none is refused naming the run."""
    cfg = tiny_cfg()
    T.train(cfg, tmp_path / "r", progress=False)
    newest = T.latest_checkpoint(tmp_path / "r")
    a, b = T.load_model(tmp_path / "r"), T.load_model(newest)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(T.RunFolderError, match="no complete checkpoint"):
        T.load_model(tmp_path / "empty")


def test_load_model_refuses_damaged_weights_naming_the_file(tmp_path):
    """A model folder whose model.safetensors is truncated (an interrupted copy or download) is refused
    with a RunFolderError naming the file, not a safetensors traceback."""
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM

    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20))
    weights = tmp_path / "m" / "model.safetensors"
    for cut in (100, -50):  # inside the header; inside the tensors
        model.save_pretrained(tmp_path / "m")
        weights.write_bytes(weights.read_bytes()[:cut])
        with pytest.raises(T.RunFolderError, match="model.safetensors is missing or damaged"):
            T.load_model(tmp_path / "m")


def test_load_model_refuses_weights_that_do_not_cover_the_config(tmp_path):
    """A folder whose config.json and model.safetensors come from different models (a partial re-save):
    a layer missing from the weights would be randomly initialised, an extra one silently dropped, and
    the model scored as if trained; load_model refuses naming the tensors."""
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM

    for n_config, n_weights, says in ((2, 1, "missing"), (1, 2, "unexpected")):
        AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=n_config, n_heads=2, d_model=16, vocab_size=20)
                            ).save_pretrained(tmp_path / "m")
        AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=n_weights, n_heads=2, d_model=16, vocab_size=20)
                            ).save_pretrained(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "model.safetensors", tmp_path / "m" / "model.safetensors")
        with pytest.raises(T.RunFolderError, match=f"do not match its config.*{says}: transformer.h.1."):
            T.load_model(tmp_path / "m")


def _text_corpus(folder, letters, seed=0):
    import random

    rng = random.Random(seed)
    folder.mkdir(exist_ok=True)
    for i in range(6):
        (folder / f"f{i}.txt").write_text("".join(rng.choice(letters) for _ in range(3000)))
    return folder


def _text_cfg(corpus, **over):
    d = dict(corpus=str(corpus), vocab_size=257, batch_size=4, lr=1e-3, warmup_tokens=0, tokens=32 * 4 * 10,
             n_checkpoints=3, n_eval_windows=4, model=dict(n_layers=1, n_heads=2, d_model=16, n_ctx=32))
    d.update(over)
    return T.TrainConfig.from_dict(d)


def test_resume_on_a_changed_corpus_is_refused(tmp_path):
    """A run whose corpus changed after it started (same path, other text) is refused on --resume, and on
    a restart of a run killed before its first checkpoint, with nothing written: continuing would train
    on other data than the checkpoints (and the saved provenance) say."""
    corpus = _text_corpus(tmp_path / "corpus", "abcdefgh ")
    cfg = _text_cfg(corpus)
    T.train(cfg, tmp_path / "r", progress=False, stop_after_steps=6)
    _text_corpus(corpus, "xyz123 ", seed=1)
    def state():  # every file but the lock (which records the pid of each process that takes it)
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.name != ".lock"}

    before = state()
    with pytest.raises(T.RunFolderError, match="corpus"):
        T.train(cfg, tmp_path / "r", progress=False, resume=True)
    assert state() == before
    shutil.rmtree(tmp_path / "r" / "checkpoints")  # killed before its first checkpoint: a plain restart
    with pytest.raises(T.RunFolderError, match="corpus"):
        T.train(cfg, tmp_path / "r", progress=False)
    _text_corpus(corpus, "abcdefgh ")  # the same text again: the run continues
    T.train(cfg, tmp_path / "r", progress=False, resume=True)


def test_corpus_cache_is_keyed_on_the_tokenizer_files(tmp_path):
    """A tokenizer given as a local folder whose files change is a new cache entry: the second source is
    the new tokenizer's encoding of the corpus, as encoding it directly gives."""
    from interventions.zoo.tokenizer import byte_tokenizer, train_tokenizer

    corpus = _text_corpus(tmp_path / "corpus", "abcdefgh ")
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    cfg = _text_cfg(corpus, tokenizer=str(tmp_path / "tok"))
    src, tok, _ = T.build_source(cfg, cache_dir=tmp_path / "cache")
    assert len(tok) == 257
    shutil.rmtree(tmp_path / "tok")
    bpe = train_tokenizer([(corpus / "f0.txt").read_text()], vocab_size=300)
    bpe.save_pretrained(tmp_path / "tok")
    src2, tok2, _ = T.build_source(cfg, cache_dir=tmp_path / "cache")
    assert len(tok2) == 300
    from interventions.zoo import corpus as C

    train_docs, _ = C.split_documents(C.load_documents(str(corpus)), cfg.val_fraction)
    ids, _ = C.tokenize_stream(train_docs, bpe, bpe.eos_token_id)
    assert src2.train.ids.tolist() == ids.tolist()


def test_corpus_cache_is_keyed_on_the_tokenisation_version(tmp_path, monkeypatch):
    """A corpus folder holding the separator's text is tokenised literally (one separator per document),
    and a cache entry made by another version of tokenize_stream (older code encoded that text as the
    separator) is never read: a new version is a new entry, recomputed."""
    import numpy as np

    from interventions.zoo import corpus as C
    from interventions.zoo.tokenizer import SEP

    corpus = _text_corpus(tmp_path / "corpus", ["a", "b", " ", SEP])
    assert all(SEP in (corpus / f"f{i}.txt").read_text() for i in range(6))
    cfg = _text_cfg(corpus)
    src, tok, _ = T.build_source(cfg, cache_dir=tmp_path / "cache")
    n_docs = len(C.load_documents(str(corpus)))
    assert sum(int((s.ids == tok.eos_token_id).sum()) for s in (src.train, src.val)) == n_docs
    [entry] = (tmp_path / "cache").iterdir()
    np.save(entry / "train_ids.npy", np.zeros_like(src.train.ids))  # stands for ids made by older code
    monkeypatch.setattr(C, "TOKENIZE_VERSION", C.TOKENIZE_VERSION + 1)
    again, _, _ = T.build_source(cfg, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert again.train.ids.tolist() == src.train.ids.tolist()


def test_resume_with_a_changed_tokenizer_is_refused(tmp_path):
    """A run whose tokenizer folder was rewritten after it started is refused on --resume (its checkpoints
    were trained on the old token ids), with nothing written; the same tokenizer again continues."""
    from interventions.zoo.tokenizer import train_tokenizer

    corpus = _text_corpus(tmp_path / "corpus", "abcdefgh ")
    first = train_tokenizer(["ab cd ef " * 200], vocab_size=300)  # same size, other merges: no shape error
    first.save_pretrained(tmp_path / "tok")
    cfg = _text_cfg(corpus, tokenizer=str(tmp_path / "tok"))
    T.train(cfg, tmp_path / "r", progress=False, stop_after_steps=6)
    shutil.rmtree(tmp_path / "tok")
    train_tokenizer(["gh ha bc " * 200], vocab_size=300).save_pretrained(tmp_path / "tok")
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    with pytest.raises(T.RunFolderError, match="tokenizer"):
        T.train(cfg, tmp_path / "r", progress=False, resume=True)
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before
    shutil.rmtree(tmp_path / "tok")
    first.save_pretrained(tmp_path / "tok")
    T.train(cfg, tmp_path / "r", progress=False, resume=True)


def test_lr_change_recorded_only_when_the_resume_goes_ahead(tmp_path):
    """--resume with a new lr on a folder that is then refused (a damaged metrics line) writes nothing:
    no lr_changes.jsonl, train_config.json untouched. When it goes ahead from an earlier checkpoint than the
    newest (the newest lacks its metrics line), the change is recorded from the step it continues from."""
    cfg = tiny_cfg()
    T.train(cfg, tmp_path / "r", progress=False, stop_after_steps=7)
    metrics = tmp_path / "r" / "metrics.jsonl"
    good = metrics.read_text()
    lines = good.splitlines(keepends=True)
    saved = (tmp_path / "r" / "train_config.json").read_text()
    metrics.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    new = T.TrainConfig.from_dict({**cfg.to_dict(), "lr": cfg.lr / 2})
    with pytest.raises(T.RunFolderError, match="damaged"):
        T.train(new, tmp_path / "r", progress=False, resume=True, stop_after_steps=0)
    assert not (tmp_path / "r" / "lr_changes.jsonl").exists()
    assert (tmp_path / "r" / "train_config.json").read_text() == saved
    metrics.write_text("".join(lines[:-1]))  # the newest checkpoint's line lost: resume from the one before
    steps = [json.loads(x)["step"] for x in lines]
    T.train(new, tmp_path / "r", progress=False, resume=True, stop_after_steps=0)
    change = json.loads((tmp_path / "r" / "lr_changes.jsonl").read_text())
    assert change == {"from_step": steps[-2], "lr_before": cfg.lr, "lr": cfg.lr / 2}


def test_rewriting_a_checkpoint_killed_mid_delete_keeps_a_verified_one(tmp_path, monkeypatch):
    """Rewriting an existing checkpoint (a resume from before it) and being killed while the old copy is
    deleted leaves step-* whole: the old copy is moved aside before it is deleted."""
    cfg = tiny_cfg()
    T.train(cfg, tmp_path / "r", progress=False)
    last = T.latest_checkpoint(tmp_path / "r")
    step = int(last.name.split("-")[1])
    model = T.load_model(last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the rewrite holds other weights

    def killed_rmtree(path, *a, **k):  # deletes one file of the folder, then the process dies
        next(p for p in sorted(path.iterdir()) if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(T.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(tmp_path / "r", step, model, opt, 123)
    assert T.verify_checkpoint(last) and T.latest_checkpoint(tmp_path / "r") == last
    assert torch.equal(next(T.load_model(last).parameters()), next(model.parameters()))  # the new copy


def test_a_rewrite_leaves_no_old_copy_and_one_killed_between_its_renames_recovers(tmp_path, monkeypatch):
    """The ``.old-step-N`` copy of a rewritten checkpoint is a crash-safety step, not a leftover: a rewrite
    that succeeds removes it; one killed after moving step-N aside but before the new copy's rename
    leaves step-N missing, and the resume trains from the checkpoint before it, writes step-N again and
    leaves no temporary behind."""
    cfg, run = tiny_cfg(), tmp_path / "r"
    T.train(cfg, run, progress=False)
    ckpts = run / "checkpoints"
    steps = sorted(p.name for p in ckpts.iterdir())
    last = T.latest_checkpoint(run)
    step = int(last.name.split("-")[1])
    model = T.load_model(last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    T.save_checkpoint(run, step, model, opt, 123)
    assert sorted(p.name for p in ckpts.iterdir()) == steps
    real, calls = os.replace, []

    def killed_replace(src, dst):  # the second rename (the new copy into place) never happens
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(T.os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(run, step, model, opt, 123)
    monkeypatch.setattr(T.os, "replace", real)
    assert last.name not in {p.name for p in ckpts.iterdir()} and T.latest_checkpoint(run).name == steps[-2]
    T.train(cfg, run, progress=False, resume=True)
    assert sorted(p.name for p in ckpts.iterdir()) == steps and T.verify_checkpoint(last)


def test_an_old_copy_left_by_a_killed_rewrite_is_not_restored(tmp_path, monkeypatch):
    """``.old-step-N`` is not renamed back to step-N by the next resume: a step is rewritten only by a resume
    from before it (here: step N's metrics line lost, and a new lr), which logs the retrained step N before
    saving it, so the old copy is the superseded trajectory (trained at the old lr). Restored, the run would
    continue from weights that its metrics line N and lr record do not describe; the resume retrains it."""
    cfg, run = tiny_cfg(), tmp_path / "r"
    T.train(cfg, run, progress=False)
    ckpts = run / "checkpoints"
    name = sorted(p.name for p in ckpts.iterdir())[-2]
    step = int(name.split("-")[1])
    old_weights = (ckpts / name / "model.safetensors").read_bytes()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(x for x in lines if json.loads(x)["step"] != step))
    real = os.replace

    def killed_replace(src, dst):  # the retrained step-N's rename into place never happens
        if Path(dst).name == name:
            raise KeyboardInterrupt
        return real(src, dst)

    new_lr = dataclasses.replace(cfg, lr=cfg.lr / 10)
    monkeypatch.setattr(T.os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        T.train(new_lr, run, progress=False, resume=True)
    monkeypatch.setattr(T.os, "replace", real)
    assert (ckpts / f".old-{name}").is_dir() and not (ckpts / name).exists()
    assert step in [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    T.train(new_lr, run, progress=False, resume=True)
    assert not (ckpts / f".old-{name}").exists() and T.verify_checkpoint(ckpts / name)
    assert (ckpts / name / "model.safetensors").read_bytes() != old_weights  # retrained at the new lr
    starts = [inv["from_step"] for inv in json.loads((run / "provenance.json").read_text())["invocations"]]
    assert starts[-1] < step, starts  # resumed from before step N, not from its old copy


def test_out_inside_a_folder_corpus_is_refused(tmp_path):
    """An --out inside the corpus folder is refused before anything is written: the run's own files
    (train_config.json, tokenizer/*.json, manifests) would join the corpus, so its --resume would always be
    refused as a changed corpus (and any later run on that folder would train on them)."""
    corpus = _text_corpus(tmp_path / "corpus", "abcdefgh ")
    cfg = _text_cfg(corpus)
    before = sorted(p.name for p in corpus.rglob("*"))
    for out in (corpus / "run", corpus / "sub" / "run", corpus):
        with pytest.raises(T.RunFolderError, match="inside the corpus folder"):
            T.train(cfg, out, progress=False)
    assert sorted(p.name for p in corpus.rglob("*")) == before
    T.train(cfg, tmp_path / "run", progress=False, stop_after_steps=5)  # outside: trains and resumes
    T.train(cfg, tmp_path / "run", progress=False, resume=True)


def test_a_start_up_leftover_tokenizer_is_not_inherited(tmp_path):
    """A folder left by a text run killed at start-up (tokenizer/ and provenance.json, no train_config.json)
    is reused by the next run; a synthetic run there must not keep that foreign tokenizer/ (the head scores
    read probe tokens and BOS from a run folder's tokenizer/), and a text run holds its own."""
    from interventions.zoo.tokenizer import byte_tokenizer, train_tokenizer

    run = tmp_path / "r"
    run.mkdir()
    byte_tokenizer().save_pretrained(run / "tokenizer")
    (run / "provenance.json").write_text("{}")
    T.train(tiny_cfg(tokens=64 * 16 * 2, n_checkpoints=2), run, progress=False)
    assert not (run / "tokenizer").exists()
    run2 = tmp_path / "r2"
    run2.mkdir()
    train_tokenizer(["ab cd ef " * 200], vocab_size=300).save_pretrained(run2 / "tokenizer")
    (run2 / "tokenizer" / "stray.json").write_text("{}")
    corpus = _text_corpus(tmp_path / "corpus", "abcdefgh ")
    T.train(_text_cfg(corpus), run2, progress=False, stop_after_steps=2)
    assert "stray.json" not in {p.name for p in (run2 / "tokenizer").iterdir()}
    from interventions.zoo.tokenizer import load_tokenizer

    assert len(load_tokenizer(str(run2 / "tokenizer"))) == 257


def test_a_config_with_tuple_values_resumes(tmp_path):
    """A TrainConfig built with a tuple where a list is declared (dense_checkpoints, accepted by validate)
    is the same run on --resume: it was refused as 'a different run' (the tuple against the saved JSON list)."""
    cfg = tiny_cfg(dense_checkpoints=[1024, 4096, 1024])
    cfg = T.TrainConfig(**{**cfg.__dict__, "dense_checkpoints": (1024, 4096, 1024)})
    T.train(cfg, tmp_path / "r", progress=False, stop_after_steps=5)
    T.train(cfg, tmp_path / "r", progress=False, resume=True)
    assert T.read_metrics(tmp_path / "r")[-1]["step"] == cfg.total_steps


def test_corpus_cache_finished_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two processes tokenising one corpus at once: the one that finishes second keeps the entry the
    first published (same key, same data) instead of deleting it under a possible reader."""
    from interventions.zoo import corpus as C

    corpus = _text_corpus(tmp_path / "corpus", "abcdefgh ")
    cfg = _text_cfg(corpus)
    real, state = C.tokenize_stream, {"inner": None}

    def racing(*args, **kwargs):  # the first call: another "process" builds the whole entry meanwhile
        if state["inner"] is None:
            state["inner"] = "running"
            T.build_source(cfg, cache_dir=tmp_path / "cache")
            # the published entry (the outer call's temporary folder sits beside it, in any listing order)
            state["inner"] = next(p for p in (tmp_path / "cache").iterdir() if (p / "done").is_file())
            state["ino"] = os.stat(state["inner"] / "train_ids.npy").st_ino
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "tokenize_stream", racing)
    src, _, _ = T.build_source(cfg, cache_dir=tmp_path / "cache")
    entry = state["inner"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]  # no tmp left
    assert os.stat(entry / "train_ids.npy").st_ino == state["ino"]  # the first entry, not replaced
    src2, _, _ = T.build_source(cfg, cache_dir=tmp_path / "cache")
    assert src.train.ids.tolist() == src2.train.ids.tolist()


def test_zoo_seeds_take_a_numpy_integer():
    """scale_seeds(scale, n) takes a numpy integer (it was refused) and refuses a bool or 0 with the library's
    count message and its reason."""
    import numpy as np

    from experiments import zoo

    assert zoo.scale_seeds("cpu", np.int64(3)) == (0, 1, 2) == zoo.scale_seeds("cpu", 3)
    assert zoo.scale_seeds("gpu") == zoo.SEEDS["gpu"]
    for bad in (True, 0, 2.0):
        with pytest.raises(ValueError, match=rf"seeds={bad!r} must be a positive integer: the number of seeds"):
            zoo.scale_seeds("cpu", bad)


def test_zoo_resume_keeps_a_lowered_lr(tmp_path, monkeypatch):
    """`reproduce` (the zoo) resuming a run continued with `train --resume --lr <lower>` keeps the lowered
    lr, as `train --resume` does: it used to put the preset's lr (the one that diverged) back, silently
    (only a line in lr_changes.jsonl said so)."""
    from experiments import zoo

    monkeypatch.setitem(zoo.SCALES, "tiny", {"attn-1l": 16 * 64 * 12})
    cfg = zoo.zoo_configs("tiny")["attn-1l"]
    run = tmp_path / "attn-1l"
    T.train(cfg, run, progress=False, stop_after_steps=3)
    lowered = T.TrainConfig.from_dict({**cfg.to_dict(), "lr": cfg.lr / 4})
    T.train(lowered, run, progress=False, resume=True, stop_after_steps=2)  # `--resume --lr`, killed again
    zoo.train_zoo("tiny", tmp_path, progress=False, workers=1)
    assert json.loads((run / "train_config.json").read_text())["lr"] == lowered.lr
    assert len((run / "lr_changes.jsonl").read_text().splitlines()) == 1
    assert T.read_metrics(run)[-1]["step"] == cfg.total_steps


def test_zoo_resume_from_before_an_lr_change_uses_the_lr_of_then(tmp_path, monkeypatch):
    """`reproduce` resuming a zoo run from a checkpoint before its `train --resume --lr` change (the later
    ones deleted) retrains at the preset's lr, as `train --resume` does, and marks the change undone: it
    used to put the run's latest lr on the steps before the change."""
    from experiments import zoo

    monkeypatch.setitem(zoo.SCALES, "tiny", {"attn-1l": 16 * 64 * 12})
    cfg = zoo.zoo_configs("tiny")["attn-1l"]
    run = tmp_path / "attn-1l"
    T.train(cfg, run, progress=False, stop_after_steps=4)
    lowered = T.TrainConfig.from_dict({**cfg.to_dict(), "lr": cfg.lr / 4})
    T.train(lowered, run, progress=False, resume=True)
    back = [c for c in T.list_checkpoints(run) if int(c.name.split("-")[1]) > 4]
    for c in back + [run / "checkpoints" / "step-00000004"]:
        shutil.rmtree(c)
    zoo.train_zoo("tiny", tmp_path, progress=False, workers=1)
    late = [m for m in T.read_metrics(run) if m["step"] > 3]  # resumed from step 3
    assert len(late) == 5 and all(m["lr"] == T.lr_at(m["step"] - 1, cfg) for m in late), late
    assert [c.get("undone_by_resume_from") for c in _lr_log(run)] == [3]
    assert json.loads((run / "train_config.json").read_text())["lr"] == cfg.lr


def test_a_tokenizer_without_an_eos_token_is_refused(tmp_path):
    """A --tokenizer with no end-of-text token is refused before anything is written: the documents used to
    be joined by id 0, silently, which for this tokenizer is "a", a real token of the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _text_corpus(tmp_path / "corpus", "abcdefgh ")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([(corpus / "f0.txt").read_text()],
                            trainer=trainers.BpeTrainer(vocab_size=40, show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert tok.eos_token_id is None and tok.convert_ids_to_tokens(0) == "a"
    tok.save_pretrained(tmp_path / "tok")
    cfg = _text_cfg(corpus, tokenizer=str(tmp_path / "tok"))
    with pytest.raises(T.ConfigError, match="no end-of-text"):
        T.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def _train_cli(out, *extra):
    """`python -m experiments train` in this process, with tiny_cfg's options; its exit code."""
    from experiments.__main__ import main

    return main(["train", "--preset", "tiny", "--out", str(out), "--tokens", str(64 * 8 * 12), "--set",
                 "n_checkpoints=5", "--quiet", *extra])


def _lr_log(run):
    return [json.loads(line) for line in (run / "lr_changes.jsonl").read_text().splitlines()]


def test_resume_from_before_an_lr_change_trains_at_the_lr_of_then(tmp_path):
    """`train --resume --lr <new>` from step 4, then checkpoints 4 and 6 deleted: a plain `--resume` continues from
    step 2 at the lr the run had there (it used to retrain steps 2-3 at the new lr), marks the change at 4
    undone in lr_changes.jsonl and ends with the weights of a run never changed; while the resume point is
    at or after the change, the new lr is kept."""
    from experiments.zoo import RUN_THREADS, torch_threads

    cfg, run = tiny_cfg(), tmp_path / "r"
    lowered = T.TrainConfig.from_dict({**cfg.to_dict(), "lr": cfg.lr / 4})
    with torch_threads(RUN_THREADS):  # every run with one thread count: byte comparisons like for like
        T.train(cfg, tmp_path / "ref", progress=False)
        T.train(cfg, run, progress=False, stop_after_steps=4)  # checkpoints 1 2 4
        T.train(lowered, run, progress=False, resume=True, stop_after_steps=1)  # from 4 at lr/4: killed
        assert _train_cli(run, "--resume") == 0  # from 4: the change is kept
        change = {"from_step": 4, "lr_before": cfg.lr, "lr": lowered.lr}
        assert [m["lr"] for m in T.read_metrics(run) if m["step"] == 6] == [T.lr_at(5, lowered)]
        assert _lr_log(run) == [change]
        for step in (4, 6):  # the checkpoints from the change on deleted
            shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
        assert _train_cli(run, "--resume") == 0  # from 2, before the change: the original lr
    assert [(m["step"], m["lr"]) for m in T.read_metrics(run)[3:]] == [(4, T.lr_at(3, cfg)), (6, T.lr_at(5, cfg))]
    assert _lr_log(run) == T.read_lr_changes(run) == [{**change, "undone_by_resume_from": 2}]
    assert T.run_lr(run, 6) == cfg.lr == json.loads((run / "train_config.json").read_text())["lr"]
    last = "checkpoints/step-00000006/model.safetensors"
    assert (run / last).read_bytes() == (tmp_path / "ref" / last).read_bytes()


def test_an_explicit_lr_from_before_a_change_is_a_change_from_there(tmp_path):
    """`--resume --lr X` naming the run's current lr X (set at step 4) while resuming from step 2 trains at
    X from step 2 and records that change: X is what was asked for, though it equals the saved lr."""
    cfg, run = tiny_cfg(), tmp_path / "r"
    T.train(cfg, run, progress=False, stop_after_steps=4)
    lowered = T.TrainConfig.from_dict({**cfg.to_dict(), "lr": cfg.lr / 4})
    T.train(lowered, run, progress=False, resume=True, stop_after_steps=1)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert _train_cli(run, "--resume", "--lr", str(lowered.lr)) == 0
    assert [(m["step"], m["lr"]) for m in T.read_metrics(run)[3:]] == [(4, T.lr_at(3, lowered)),
                                                                        (6, T.lr_at(5, lowered))]
    assert _lr_log(run) == [{"from_step": 4, "lr_before": cfg.lr, "lr": lowered.lr, "undone_by_resume_from": 2},
                            {"from_step": 2, "lr_before": cfg.lr, "lr": lowered.lr}]
    assert [T.run_lr(run, s) for s in (0, 1, 2, 6)] == [cfg.lr, cfg.lr, lowered.lr, lowered.lr]


def test_leftover_temporaries_of_dead_writers_are_removed_at_the_next_start(tmp_path, dead_and_live_pid):
    """What writes killed mid-way left in a run folder goes at the next start, and only that: temporary files
    of a pid that is gone (either name form), the checkpoint temp folder (written only under the run's
    lock, which this start holds) and an old copy beside its checkpoint. A live pid's file, another
    machine's, and an old copy that is its step's one copy are kept; without an OS lock, only what names
    this machine and a pid that is gone."""
    from interventions.zoo.ownership import HOST

    dead, live = dead_and_live_pid
    cfg, run = tiny_cfg(), tmp_path / "r"
    T.train(cfg, run, progress=False, stop_after_steps=2)
    ckpts = run / "checkpoints"
    gone = [run / f".metrics.jsonl.tmp{dead}", run / f".train_config.json.tmp{dead}-{HOST}-0badf00d",
            ckpts / ".tmp-step-00000004", ckpts / ".old-step-00000002"]
    kept = [run / f".provenance.json.tmp{live}-{HOST}-0badf00d", run / f".x.tmp{dead}-00000000-0badf00d",
            ckpts / ".old-step-00000006"]
    for p in gone + kept:
        if p.parent == ckpts:
            shutil.copytree(ckpts / "step-00000001", p)
        else:
            p.write_text("half")
    with pytest.MonkeyPatch.context() as m:  # no OS lock (not POSIX): only what names its machine and pid
        m.setattr(T, "LOCKING", False)
        T.train(cfg, run, progress=False, resume=True, stop_after_steps=0)
    assert [p.name for p in gone + kept if not p.exists()] == [gone[1].name]
    T.train(cfg, run, progress=False, resume=True, stop_after_steps=0)
    assert [p.name for p in gone if p.exists()] == [] and [p.name for p in kept if not p.exists()] == []
    assert [p.name for p in T.list_checkpoints(run)] == ["step-00000001", "step-00000002"]


def test_leftover_corpus_cache_entries_of_dead_writers_are_removed(tmp_path, dead_and_live_pid):
    """Tokenising a corpus removes the cache's temporary entries left by killed tokenisations on this
    machine (pid gone), never one a live process is filling, one of another machine sharing the cache (its
    pid means nothing here) or one named before writers were (no pid)."""
    from interventions.zoo.ownership import HOST

    dead, live = dead_and_live_pid
    cache = tmp_path / "cache"
    gone = cache / f"0123456789abcdef.tmp{dead}-{HOST}-a_b1c2d3"
    kept = [cache / f"0123456789abcdef.tmp{live}-{HOST}-a_b1c2d3", cache / f"0123456789abcdef.tmp{dead}-00000000-x",
            cache / "0123456789abcdef.tmp12345678"]
    for p in [gone, *kept]:
        (p / "tokenizer").mkdir(parents=True)
    T.build_source(_text_cfg(_text_corpus(tmp_path / "corpus", "abcdefgh ")), cache_dir=cache)
    assert not gone.exists() and all(p.exists() for p in kept)
    assert [p.name for p in cache.iterdir() if ".tmp" not in p.name and (p / "done").is_file()]  # the entry


def test_standalone_train_uses_the_zoo_thread_count(tmp_path):
    """`python -m experiments train` trains with the threads of `reproduce`'s runs (zoo.RUN_THREADS; it used
    torch's default, so its numbers differed from a reproduction's), recorded in provenance.json for each
    start, and leaves the caller's count as it was; an explicit --threads wins."""
    from experiments.zoo import RUN_THREADS

    def threads():  # of each start, as provenance.json records them
        return [s["machine"]["threads"] for s in json.loads((tmp_path / "r" / "provenance.json").read_text())[
            "invocations"]]

    caller = torch.get_num_threads()
    torch.set_num_threads(RUN_THREADS + 1)
    try:
        assert _train_cli(tmp_path / "r") == 0
        assert threads() == [RUN_THREADS] and torch.get_num_threads() == RUN_THREADS + 1
        assert _train_cli(tmp_path / "r", "--resume", "--threads", str(RUN_THREADS + 2)) == 0
        assert threads() == [RUN_THREADS, RUN_THREADS + 2]
    finally:
        torch.set_num_threads(caller)


def test_write_probes_of_two_starts_never_collide(tmp_path, dead_and_live_pid, monkeypatch):
    """The write probe made before the run folder's lock is named per process: two starts at once on one
    new folder used to share `.write-test`, so one could delete the other's and fail with a misleading
    "cannot write". Another process's probe and the fixed-name one an older start left stay as they were,
    beside this one's, and are not taken for foreign files: training goes ahead."""
    from interventions.zoo.ownership import HOST

    _, live = dead_and_live_pid
    run = tmp_path / "r"
    run.mkdir()
    theirs = [run / ".write-test", run / f".write-test.tmp{live}-{HOST}-0badf00d"]
    for p in theirs:
        p.write_text("theirs")
    seen = []
    real_unlink = Path.unlink

    def unlink(self, *a, **k):  # the probes present when this start removes its own
        if self.name.startswith(".write-test"):
            seen.append(sorted(p.name for p in run.glob(".write-test*")))
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", unlink)
    T.train(tiny_cfg(), run, progress=False, stop_after_steps=1)
    assert [p.read_text() for p in theirs] == ["theirs", "theirs"]
    assert len(seen) == 1 and len(seen[0]) == 3 and {p.name for p in theirs} < set(seen[0]), seen
    assert sorted(p.name for p in run.glob(".write-test*")) == sorted(p.name for p in theirs)


def test_a_damaged_lr_changes_line_is_refused_and_nothing_written(tmp_path):
    """lr_changes.jsonl is read on every resume (it says which lr each step had): a damaged line stops
    the resume naming the file and line, with nothing written; deleting it as advised resumes."""
    cfg, run = tiny_cfg(), tmp_path / "r"
    T.train(cfg, run, progress=False, stop_after_steps=2)
    lowered = T.TrainConfig.from_dict({**cfg.to_dict(), "lr": cfg.lr / 4})
    T.train(lowered, run, progress=False, resume=True, stop_after_steps=0)
    log = run / "lr_changes.jsonl"
    log.write_text("garbage\n" + log.read_text())
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(T.RunFolderError, match=f"{log} line 1 is damaged"):
        T.train(cfg, run, progress=False, resume=True, keep_lr=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    log.write_text(log.read_text().split("\n", 1)[1])
    T.train(cfg, run, progress=False, resume=True, keep_lr=True)
    assert [m["lr"] for m in T.read_metrics(run) if m["step"] == 6] == [T.lr_at(5, lowered)]
