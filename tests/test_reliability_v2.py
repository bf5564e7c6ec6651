"""Reliability v2 (issue 14): ownership of run and results folders, damaged logs and checkpoints,
typed configs validated before anything is written, results that cannot go stale, advice that works,
exit codes, safetensors-only hub loading, duplicate ablations.

Each test states the scenario and the invariant; where an error message suggests a fix, the test
follows it and checks that it works. Tiny runs (19 steps of 1024 tokens, one thread).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.__main__ import main as cli_main
from experiments.common import InputError, ResultError, Results, model_fingerprint
from experiments.presets import get_preset
from interventions.zoo import train as T
from interventions.zoo.ownership import FolderBusyError

REPO = Path(__file__).resolve().parents[1]
TOKENS = 20_000  # tiny preset: 19 steps of 1024 tokens
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

# A stand-in for another process holding a folder: the same flock, pid written, then sleep.
HOLDER = r'''
import fcntl, os, sys, time
f = open(os.path.join(sys.argv[1], ".lock"), "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"{os.getpid()}\n"); f.flush()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
'''


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir', or 'special' for a FIFO: never opened) of everything under root."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else "special" if not p.is_file()
                                       else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.name != ".lock"}  # the lock file: created by owning the folder


def tiny_cfg(**over) -> T.TrainConfig:
    d = get_preset("tiny")
    d.update(tokens=TOKENS)
    d.update(over)
    return T.TrainConfig.from_dict(d)


def train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--out", str(out), "--tokens", str(TOKENS), "--quiet", *extra]


def cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of an in-process CLI call."""
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def hold(folder: Path, seconds: float) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    T.train(tiny_cfg(), run, progress=False)
    return run


def final_bytes(run: Path) -> bytes:
    return (max((run / "checkpoints").glob("step-*")) / "model.safetensors").read_bytes()


@pytest.fixture
def finished(tmp_path, reference) -> Path:
    """A copy of the finished reference run (the lock file left out)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns(".lock"))
    return run


# ----------------------------------------------------------------------------- 1. ownership

def test_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path, capsys):
    """While another process owns the run folder, `train` exits 2 naming that process's pid and the
    --wait option, and changes nothing; following the advice (--wait) trains once the holder ends."""
    out = tmp_path / "run"
    holder = hold(out, 2.0)
    try:
        before = snapshot(tmp_path)
        code, err = cli(train_argv(out), capsys)
        assert code == 2, err
        assert f"process {holder.pid}" in err and "--wait" in err, err
        assert snapshot(tmp_path) == before
        code, err = cli(train_argv(out, "--wait", "60"), capsys)  # the advice: wait for the holder
        assert code == 0, err
    finally:
        holder.kill()
        holder.wait()
    assert T.latest_checkpoint(out).name == "step-00000019"


def test_train_holds_the_run_lock_while_it_runs(tmp_path, monkeypatch):
    """During training (at a checkpoint write) another process cannot take the run folder's lock."""
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'a+')\n"
             "try:\n    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n    print('locked')")
    seen = []
    real = T.save_checkpoint

    def save(run_dir, *a, **k):
        if not seen:
            seen.append(subprocess.run([sys.executable, "-c", probe, str(Path(run_dir) / ".lock")],
                                       capture_output=True, text=True).stdout.strip())
        return real(run_dir, *a, **k)

    monkeypatch.setattr(T, "save_checkpoint", save)
    T.train(tiny_cfg(tokens=4096), tmp_path / "run", progress=False)
    assert seen == ["locked"]


def test_results_folder_is_owned(tmp_path):
    """While another process owns a results folder, `reproduce` and any table write raise
    FolderBusyError naming its pid and nothing is written; after it ends, writing works."""
    from experiments.reproduce import reproduce

    root = tmp_path / "results"
    holder = hold(root, 30)
    try:
        with pytest.raises(FolderBusyError, match=f"process {holder.pid}"):
            reproduce(out=root, scale="tiny", progress=False)
        with pytest.raises(FolderBusyError, match=f"process {holder.pid}"):
            Results(root, "exp").write("t", pd.DataFrame({"x": [1]}))
        assert sorted(p.name for p in root.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    Results(root, "exp").write("t", pd.DataFrame({"x": [1]}))
    assert Results(root, "exp").read("t").x.tolist() == [1]


def test_figures_and_report_refuse_a_results_folder_in_use(tmp_path, capsys):
    """`figures` and `report` took no lock: while `reproduce` (or `phase-change`, `ablations`) was writing into the
    results folder, `figures` drew whatever tables were there at that moment (e.g. an ablation folder with its
    per-head table but not yet its sets), exit 0. Now they hold the folder's lock: exit 2 naming the holder,
    nothing drawn; with --wait they go on once it is released."""
    res = Results(tmp_path / "results", "phase_change")
    res.write_provenance({"n_windows": 64})
    res.write("checkpoints", pd.DataFrame({"model": ["m"], "tokens": [1]}))
    holder = hold(res.root, 30)
    try:
        before = snapshot(tmp_path)
        for argv in (["figures", "--results", res.root, "--out", tmp_path / "figs"], ["report", "--results", res.root]):
            code, err = cli(argv, capsys)
            assert code == 2 and f"in use by process {holder.pid}" in err, (argv, err)
            assert snapshot(tmp_path) == before, argv
    finally:
        holder.kill()
        holder.wait()
    holder = hold(res.root, 1.0)
    try:
        code, err = cli(["report", "--results", res.root, "--wait", "30"], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and "no recorded invocation that ran to completion" in err, err  # it waited, then went on
    # a results folder the user cannot write (its lock cannot be made): read as before, no lock
    import interventions.zoo.ownership as O

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied", str(res.root / ".lock"))

    real, O.owned = O.owned, read_only
    try:
        code, err = cli(["report", "--results", res.root], capsys)
    finally:
        O.owned = real
    assert code == 2 and "no recorded invocation that ran to completion" in err, err


# ----------------------------------------------------------------------------- 2. damaged logs and checkpoints

def test_garbage_line_in_metrics_stops_resume_then_advice_works(finished, reference, capsys):
    """A garbage line in the middle of metrics.jsonl: --resume exits 2 naming the line and changes
    nothing; deleting that line (the advice) and resuming restores every line, bit-identical."""
    path = finished / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(3, "}}garbage{{\n")
    path.write_text("".join(lines))
    before = snapshot(finished)
    code, err = cli(train_argv(finished, "--resume"), capsys)
    assert code == 2 and "line 4" in err and "Delete that line" in err, err
    assert snapshot(finished) == before
    del lines[3]
    path.write_text("".join(lines))
    code, err = cli(train_argv(finished, "--resume"), capsys)
    assert code == 0, err
    assert T.read_metrics(finished) == T.read_metrics(reference)


@pytest.mark.parametrize("damage", ["torn last line", "line deleted", "metrics.jsonl deleted"])
def test_lost_metrics_lines_are_recomputed_on_resume(finished, reference, capsys, damage):
    """A torn last line, a missing line or a deleted metrics.jsonl on a finished run: --resume says
    what it recomputes and ends with every line, equal to the uninterrupted run's."""
    path = finished / "metrics.jsonl"
    text = path.read_text()
    if damage == "torn last line":
        path.write_text(text[:-20])
    elif damage == "line deleted":
        lines = text.splitlines(keepends=True)
        path.write_text("".join(lines[:4] + lines[5:]))
    else:
        path.unlink()
    code, err = cli(train_argv(finished, "--resume"), capsys)
    assert code == 0, err
    assert "recompute" in err, err
    assert T.read_metrics(finished) == T.read_metrics(reference)
    assert final_bytes(finished) == final_bytes(reference)


def test_reading_damaged_metrics_names_the_file(finished):
    """read_metrics on a torn or missing metrics.jsonl raises RunFolderError naming it."""
    path = finished / "metrics.jsonl"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(T.RunFolderError, match="metrics.jsonl line"):
        T.read_metrics(finished)
    path.unlink()
    with pytest.raises(T.RunFolderError, match="metrics.jsonl is missing"):
        T.read_metrics(finished)


@pytest.mark.parametrize("damage", ["manifests deleted", "a flipped byte"])
def test_unverifiable_checkpoints_are_never_replaced(finished, reference, capsys, damage):
    """Checkpoints without a verifiable manifest: --resume exits 2 naming them and deletes or
    replaces nothing; moving them away (the advice) and resuming ends bit-identical."""
    ckpts = sorted((finished / "checkpoints").glob("step-*"))
    if damage == "manifests deleted":
        bad = ckpts
        for c in bad:
            (c / "manifest.json").unlink()
    else:
        bad = ckpts[-2:-1]
        data = bytearray((bad[0] / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (bad[0] / "model.safetensors").write_bytes(bytes(data))
    before = snapshot(finished)
    code, err = cli(train_argv(finished, "--resume"), capsys)
    assert code == 2 and "no verifiable manifest" in err and bad[-1].name in err, err
    assert snapshot(finished) == before
    aside = finished.parent / "aside"
    aside.mkdir()
    for c in bad:
        c.rename(aside / c.name)
    code, err = cli(train_argv(finished, "--resume"), capsys)
    assert code == 0, err
    assert final_bytes(finished) == final_bytes(reference)
    assert T.read_metrics(finished) == T.read_metrics(reference)


# ----------------------------------------------------------------------------- 3. typed, validated configs

def _fifo(d: Path) -> Path:
    os.mkfifo(d / "f.txt")
    return d / "f.txt"


def _write(path: Path, data) -> Path:
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


# name -> (extra argv (with {tmp}), setup(tmp) or None, message fragment)
CONFIG_CASES = {
    "typo in a model key": (["--set", "model.nlayers=5"], None, "did you mean 'model.n_layers'"),
    "typo in a top-level key": (["--set", "weight_decy=0.1"], None, "did you mean 'weight_decay'"),
    "bool that is not a bool": (["--set", "model.smear_keys=maybe"], None, "model.smear_keys='maybe'"),
    "string for a number": (["--set", "lr=fast"], None, "lr='fast' must be a number"),
    "grad_clip -1": (["--set", "grad_clip=-1"], None, "grad_clip=-1"),
    "grad_clip 0": (["--set", "grad_clip=0"], None, "grad_clip=0"),
    "d_head 0": (["--set", "model.d_head=0"], None, "model.d_head=0"),
    "weight_decay -5": (["--set", "weight_decay=-5"], None, "weight_decay=-5"),
    "min_lr_ratio 50": (["--set", "min_lr_ratio=50"], None, "min_lr_ratio=50"),
    "min_lr_ratio 0": (["--set", "min_lr_ratio=0"], None, "min_lr_ratio=0"),
    "seed 1.5": (["--set", "seed=1.5"], None, "seed=1.5 must be an integer"),
    "seed -1": (["--seed", "-1"], None, "seed=-1"),
    "batch_size true": (["--set", "batch_size=true"], None, "batch_size=True must be an integer"),
    "betas of one value": (["--set", "betas=[0.9]"], None, "betas"),
    "option nested under a value": (["--set", "lr.x=1"], None, "lr={'x': 1} must be a number"),
    "empty corpus path": (["--corpus", ""], None, "--corpus ''"),
    "FIFO as corpus": (["--corpus", "{tmp}/f.txt"], _fifo, "named pipe"),
    "/dev/zero as corpus": (["--corpus", "/dev/zero"], None, "not a regular file"),
    "JSONL text null": (["--corpus", "{tmp}/c.jsonl"],
                        lambda d: _write(d / "c.jsonl", '{"text": "ok"}\n{"text": null}\n'), "line 2"),
    "JSONL invalid UTF-8": (["--corpus", "{tmp}/c.jsonl"],
                            lambda d: _write(d / "c.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'),
                            "line 2 is not valid UTF-8"),
    "device tpu": (["--device", "tpu"], None, "'tpu' is not a known device"),
    "device CUDA": (["--device", "CUDA"], None, "'CUDA' is not a known device"),
    "device bogus via --set": (["--set", "device=bogus"], None, "device='bogus' is not a known device"),
    "--out is a file": ([], lambda d: _write(d / "out", "x"), "is a file"),
    # a dense stretch ending before it starts gave no dense checkpoint, silently
    "dense_checkpoints end before start": (["--set", "dense_checkpoints=[8192,2048,1024]"], None, "start <= end"),
    # n_ctx 2 crashed with a traceback at the first evaluation, after train_config.json was written; 3 logged
    # NaN repeat losses
    "n_ctx 2": (["--set", "model.n_ctx=2"], None, "model.n_ctx=2 is too short"),
    "n_ctx 3": (["--set", "model.n_ctx=3"], None, "model.n_ctx=3 is too short"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_exits_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    """Each bad option exits 2 with one line naming it (unknown keys with the closest valid name),
    without hanging, and writes nothing."""
    extra, setup, message = CONFIG_CASES[case]
    monkeypatch.setenv("INTERVENTIONS_CACHE", str(tmp_path / "cache"))
    if setup is not None:
        setup(tmp_path)
    argv = train_argv(tmp_path / "out", *[a.format(tmp=tmp_path) for a in extra])
    if "jsonl" in case.lower():
        argv = [a if a != "tiny" else "attn-1l" for a in argv]  # a text corpus: the byte-level preset
    before = snapshot(tmp_path)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung")))
    signal.alarm(60)
    try:
        code, err = cli(argv, capsys)
    finally:
        signal.alarm(0)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_text_values_parse_to_declared_types():
    """`--set` text becomes the declared type: booleans from true/false/True/False/1/0, integral
    numbers for ints; the parsed model option is really used."""
    from experiments.__main__ import _parse_set

    for text, value in (("False", False), ("false", False), ("0", False), ("True", True), ("1", True)):
        cfg = tiny_cfg(model={**get_preset("tiny")["model"], **_parse_set([f"model.smear_keys={text}"])["model"]})
        assert cfg.model["smear_keys"] is value
    assert tiny_cfg(**_parse_set(["tokens=1e4"])).tokens == 10_000
    from interventions import AttnOnlyForCausalLM

    cfg = tiny_cfg(model={**get_preset("tiny")["model"], "smear_keys": "False"})
    model = AttnOnlyForCausalLM(T.AttnOnlyConfig(**cfg.model))
    assert all(m.smear is None for m in model.modules() if hasattr(m, "smear"))  # a vanilla model


def test_new_fields_are_validated_from_their_annotations():
    """A field added to TrainConfig is parsed and checked from its annotation with no other change:
    a Literal refuses other values (suggesting the closest), an int refuses a string."""
    import dataclasses
    from typing import Literal

    @dataclasses.dataclass(frozen=True)
    class Extended(T.TrainConfig):
        schedule: Literal["constant", "cosine"] = "constant"
        keep_every: int = 10

    with pytest.raises(T.ConfigError, match="did you mean 'cosine'"):
        Extended.from_dict({"schedule": "cosin"})
    with pytest.raises(T.ConfigError, match="keep_every='ten' must be an integer"):
        Extended.from_dict({"keep_every": "ten"})
    with pytest.raises(T.ConfigError, match="keep_every='ten'"):
        Extended(keep_every="ten").validate()  # built directly, not from a dict: still checked
    assert Extended.from_dict({"schedule": "cosine"}).schedule == "cosine"


def test_corpus_checked_before_train_config_is_written(tmp_path, capsys, monkeypatch):
    """A bad JSONL line is refused before train_config.json exists, so the corrected command is not
    refused as 'a different run'."""
    monkeypatch.setenv("INTERVENTIONS_CACHE", str(tmp_path / "cache"))
    corpus = _write(tmp_path / "c.jsonl", "".join(json.dumps({"text": f"doc {i} " * 40}) + "\n" for i in range(30))
                    + '{"text": 5}\n')
    argv = ["train", "--preset", "attn-1l", "--out", tmp_path / "out", "--corpus", corpus, "--tokens", "2048",
            "--set", "model.d_model=16", "--set", "model.n_ctx=32", "--set", "batch_size=2", "--set",
            "n_eval_windows=2", "--set", "n_checkpoints=2", "--set", "warmup_tokens=64", "--quiet"]
    code, err = cli(argv, capsys)
    assert code == 2 and "line 31" in err, err
    assert not (tmp_path / "out").exists()
    corpus.write_text(corpus.read_text().replace('{"text": 5}\n', ""))
    code, err = cli(argv, capsys)
    assert code == 0, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("command", ["phase-change", "ablations", "circuit", "survey"])
def test_cuda_without_gpu_exits_2(command, reference, tmp_path, capsys):
    """`--device cuda` on a machine without CUDA: exit 2 naming --device, no folder written."""
    code, err = cli([command, reference, "--out", tmp_path / "res", "--device", "cuda"], capsys)
    assert code == 2 and "--device='cuda'" in err and "no CUDA" in err, err
    assert not (tmp_path / "res").exists()


# ----------------------------------------------------------------------------- 4. results that cannot go stale

def test_reading_results_creates_nothing(tmp_path):
    """has/read_optional/read_json on a folder that does not exist create no folder."""
    res = Results(tmp_path / "nowhere", "exp")
    assert not res.has("t") and res.read_optional("t") is None and res.read_json("x") is None
    assert not res.has_array("a")
    with pytest.raises(ResultError, match="missing"):
        res.read("t")
    assert not (tmp_path / "nowhere").exists()


def test_read_optional_refuses_a_recorded_table_whose_file_was_deleted(tmp_path):
    """A table the manifest records but whose file was deleted (as a checksum error advises) is missing,
    not never written: read_optional raises instead of returning None, which made `report` drop the
    ablation / path-patching sections and `figures` their figures without a word."""
    res = Results(tmp_path, "ablations_m")
    res.write("sets", pd.DataFrame({"x": [1]}))
    assert res.read_optional("sets") is not None and res.read_optional("never") is None
    (res.dir / "sets.csv").unlink()
    with pytest.raises(ResultError, match="missing"):
        res.read_optional("sets")


def test_tables_are_keyed_on_their_inputs(tmp_path):
    """A table recorded for some inputs counts as done only for those inputs; read with other inputs
    is a stale-result error."""
    res = Results(tmp_path, "exp")
    res.write("t", pd.DataFrame({"x": [1]}), inputs={"run": "a", "n_windows": 64})
    assert res.has("t", {"run": "a", "n_windows": 64}) and not res.has("t", {"run": "b", "n_windows": 64})
    with pytest.raises(ResultError, match="other inputs"):
        res.read("t", inputs={"run": "a", "n_windows": 16})


def test_other_settings_are_refused_and_provenance_kept(tmp_path):
    """write_provenance with other settings over existing tables raises naming what differs and
    leaves provenance.json as it was; deleting the folder (the advice) lets the new settings run."""
    res = Results(tmp_path, "ablations_m")
    res.write_provenance({"n_windows": 64})
    res.write("sets", pd.DataFrame({"x": [1]}))
    before = snapshot(tmp_path)
    with pytest.raises(ResultError, match=r"other settings \(differing: \['n_windows'\]\)") as e:
        res.write_provenance({"n_windows": 16})
    assert snapshot(tmp_path) == before
    assert f"delete the folder {res.dir}" in str(e.value)
    shutil.rmtree(res.dir)
    res.write_provenance({"n_windows": 16})
    assert json.loads((res.dir / "provenance.json").read_text())["config"] == {"n_windows": 16}


def test_provenance_is_checksummed(tmp_path):
    """provenance.json (where the report takes its machine, commit and PCA pairs from) is verified like a
    table: an edited one raised nothing (the report stated the edit) and a truncated one a JSONDecodeError
    traceback; both are a ResultError naming it, also from verify_tables (report, figures). Re-running
    the experiment (write_provenance) repairs it."""
    from experiments.common import verify_tables

    res = Results(tmp_path, "phase_change")
    res.write_provenance({"n_windows": 64})
    res.write("checkpoints", pd.DataFrame({"x": [1]}))
    path = res.dir / "provenance.json"
    good = res.read_provenance()
    assert good["config"] == {"n_windows": 64} and Results(tmp_path, "none").read_provenance() is None
    verify_tables(tmp_path)
    for damage in (lambda t: t.replace('"config"', '"config" ', 1), lambda t: t[:100]):
        path.write_text(damage(json.dumps(good, indent=1)))
        with pytest.raises(ResultError, match="provenance.json"):
            res.read_provenance()
        with pytest.raises(ResultError, match="provenance.json"):
            verify_tables(tmp_path)
    res.write_provenance({"n_windows": 64})
    assert res.read_provenance()["config"] == {"n_windows": 64}


def test_a_deleted_provenance_is_refused(tmp_path):
    """provenance.json deleted from a folder whose manifest records it: read_provenance returned None, so
    verify_tables passed and the report left the folder out of "Tables computed by" without a word (the
    tables' commit and machine lost). Now a ResultError naming it; re-running the experiment writes it again."""
    from experiments.common import verify_tables

    res = Results(tmp_path, "ablations_m")
    res.write_provenance({"n_windows": 64})
    res.write("sets", pd.DataFrame({"x": [1]}))
    (res.dir / "provenance.json").unlink()
    with pytest.raises(ResultError, match=r"provenance\.json is missing though .*manifest\.json records it"):
        res.read_provenance()
    with pytest.raises(ResultError, match="provenance.json is missing"):
        verify_tables(tmp_path)
    with pytest.raises(ResultError, match="provenance.json is missing"):
        res.made_by()
    res.write_provenance({"n_windows": 64})
    assert res.read_provenance()["config"] == {"n_windows": 64}
    verify_tables(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_rewritten_provenance_does_not_credit_the_new_invocation_with_older_tables(tmp_path, damage):
    """provenance.json damaged (or deleted), then rewritten by re-running as its error advises: the fresh
    record numbered the new invocation 0, which the tables already there also point at, so the report's
    "Tables computed by" credited them to this invocation's commit and machine. Now their invocations are
    recorded as unknown, and only tables written after the rewrite are this invocation's."""
    from experiments.common import LOST_INVOCATION

    res = Results(tmp_path, "ablations_m")
    res.write_provenance({"n_windows": 64})
    res.write("sets", pd.DataFrame({"x": [1]}))
    path = res.dir / "provenance.json"
    if damage == "truncate":
        path.write_text(path.read_text()[:20])
    else:
        path.unlink()
    res.write_provenance({"n_windows": 64})
    assert res.made_by() == [LOST_INVOCATION]
    res.write("heads", pd.DataFrame({"x": [2]}))
    made = res.made_by()
    assert made[0] == LOST_INVOCATION and len(made) == 2 and made[1]["git"] != LOST_INVOCATION["git"]


def test_figures_refuse_a_deleted_table_before_drawing(tmp_path, capsys):
    """A table the manifest records whose file was deleted: verify_tables passed it (it checked the files
    present only), so `figures` drew every figure read before it, then stopped with "missing", leaving
    figures of a partial folder. Now verify_tables names it and `figures` exits 2 with nothing written."""
    from experiments.common import verify_tables

    res = Results(tmp_path / "results", "phase_change")
    res.write_provenance({"n_windows": 64})
    res.write("checkpoints", pd.DataFrame({"model": ["m"], "tokens": [1]}))
    res.write("windows", pd.DataFrame({"model": ["m"]}))
    res.write_array("per_token_losses_m", np.zeros(3))
    (res.dir / "per_token_losses_m.npy").unlink()  # arrays are not read by figures or report: not required
    verify_tables(res.root)
    (res.dir / "windows.csv").unlink()
    with pytest.raises(ResultError, match=r"windows\.csv is missing though .*manifest\.json records it"):
        verify_tables(res.root)
    before = snapshot(tmp_path)
    code, err = cli(["figures", "--results", str(res.root), "--out", str(tmp_path / "figs")], capsys)
    assert code == 2 and "windows.csv is missing" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "figs").exists()


def test_arrays_are_checksummed(tmp_path):
    """An edited or garbled .npy raises ResultError naming the file; deleting it makes it missing
    (so the experiment recomputes it)."""
    res = Results(tmp_path, "phase_change")
    path = res.write_array("per_token_losses_m", np.arange(12.0).reshape(3, 4), inputs={"run": "a"})
    np.testing.assert_array_equal(res.read_array("per_token_losses_m"), np.arange(12.0).reshape(3, 4))
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ResultError, match=f"{path}.*delete"):
        res.read_array("per_token_losses_m")
    path.unlink()
    assert not res.has_array("per_token_losses_m", {"run": "a"})


def _phase_change_tables(root: Path) -> None:
    """The tables ``reproduce.headline`` reads, made by the real window and plateau code on a small
    synthetic training curve."""
    from experiments.phase_change import add_plateau, detect_windows

    tokens = np.geomspace(1e5, 2e7, 12).astype(int)
    icl = -0.4 / (1 + np.exp(-(np.log10(tokens) - 6.8) / 0.05))
    ck = pd.DataFrame({"model": "attn-2l", "step": range(1, 13), "tokens": tokens, "val_loss": np.linspace(3, 1, 12),
                       "icl_score": icl, "icl_sem": 0.01})
    hs = pd.DataFrame({"model": "attn-2l", "step": range(1, 13), "tokens": tokens, "layer": 1, "head": 0,
                       "score": "induction", "value": -icl})
    precise = pd.DataFrame({"model": "attn-2l", "point": ["final", "at_80pct", "final_minus_at_80pct"],
                            "step": [12, 11, -1], "tokens": [int(tokens[-1]), int(tokens[-2]), -1],
                            "icl_score": [-0.4, -0.4, 0.0], "icl_sem": [0.02, 0.02, 0.01], "n": 64})
    pc = Results(root, "phase_change")
    pc.write("checkpoints", ck)
    pc.write("head_scores", hs)
    pc.write("icl_precise", precise)
    pc.write("windows", add_plateau(detect_windows(ck, hs), precise))
    pc.write("pca_turn", pd.DataFrame({"model": ["attn-2l"], "window_start_tokens": [5e6], "window_end_tokens": [8e6],
                                       "turn_deg": [40.0]}))
    pc.write("transient", pd.DataFrame(columns=["model", "step", "tokens", "layer", "band", "entropy"]))
    abl = Results(root, "ablations_attn-2l")
    abl.write("sets", pd.DataFrame({"group": ["clean", "induction heads", "random (non-induction)", "all other heads"],
                                    "set": ["clean", "induction heads", "random 0", "all other heads"],
                                    "heads": ["", "L1H0", "L0H1", "L0H0 L0H1"],
                                    "icl_score": [-0.4, 0.0, -0.45, 0.1], "icl_sem": 0.02,
                                    "icl_change": [0.0, 0.4, -0.05, 0.5], "icl_change_sem": 0.01,
                                    "icl_share_removed": [0.0, 0.9, 0.1, 1.2], "icl_share_removed_sem": 0.05}))
    abl.write("per_head", pd.DataFrame({"kind": "pattern", "layer": [0, 0, 1], "head": [0, 1, 0],
                                        "is_induction": [False, False, True], "icl_share": [-0.1, 0.05, 0.9]}))


def test_figures_and_report_refuse_an_edited_table(tmp_path, capsys):
    """An edited table is an error naming it for `figures` (exit 2, one line) and for the report's
    headline, never a silently missing figure or report line."""
    from experiments.reproduce import headline

    _phase_change_tables(tmp_path)
    assert headline(tmp_path)["ablation"]["icl_share_removed"] == pytest.approx(0.9)
    sets = tmp_path / "ablations_attn-2l" / "sets.csv"
    good = sets.read_text()
    sets.write_text(good.replace("0.9", "0.8"))
    with pytest.raises(ResultError, match=str(sets)):
        headline(tmp_path)
    sets.write_text(good)  # figures name the first damaged table they find: only checkpoints.csv is, now
    ck = tmp_path / "phase_change" / "checkpoints.csv"
    ck.write_text(ck.read_text().replace("3.0", "3.5"))
    code, err = cli(["figures", "--results", tmp_path, "--out", tmp_path / "figs"], capsys)
    assert code == 2 and str(ck) in err and "Traceback" not in err, err


def test_survey_caches_by_content_not_by_name(tmp_path):
    """Two model folders with one basename are two labels; a re-saved (different) model under the
    same path is scored again, not served from the cache."""
    from experiments.survey import model_labels, run_survey
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM

    def save(folder, seed):
        torch.manual_seed(seed)
        AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=32, vocab_size=20)
                            ).save_pretrained(folder)

    save(tmp_path / "a" / "step-00000005", 0)
    save(tmp_path / "b" / "step-00000005", 1)
    labels = model_labels([str(tmp_path / "a" / "step-00000005"), str(tmp_path / "b" / "step-00000005")])
    assert len(labels) == 2
    one = {"m": str(tmp_path / "a" / "step-00000005")}
    first = run_survey(one, tmp_path / "res").read("induction_scores")
    fp = model_fingerprint(one["m"])
    save(tmp_path / "a" / "step-00000005", 2)  # re-saved, different weights
    assert model_fingerprint(one["m"]) != fp
    second = run_survey(one, tmp_path / "res").read("induction_scores")
    assert not np.allclose(first.score, second.score)


def test_phase_change_recomputes_for_a_changed_run_and_deleting_a_table_works(finished, tmp_path):
    """phase_change tables are keyed on the run's content: after the run changes (trained further)
    they are recomputed; a damaged per-model table's advice (delete it, re-run) recomputes it; other
    settings (--windows) into the same folder are refused with provenance kept."""
    from experiments.phase_change import run_phase_change

    runs = {"m": finished}
    res = run_phase_change(runs, tmp_path / "res", n_windows=4, progress=False)
    n_before = len(res.read("checkpoints"))
    path = res.dir / "head_scores_m.csv"
    path.write_text(path.read_text().replace("0.", "1.", 1))
    with pytest.raises(ResultError, match="delete") as e:
        run_phase_change(runs, tmp_path / "res", n_windows=4, progress=False)
    assert str(path) in str(e.value)
    path.unlink()  # the advice
    run_phase_change(runs, tmp_path / "res", n_windows=4, progress=False)
    assert len(res.read("head_scores_m")) > 0
    prov = (res.dir / "provenance.json").read_bytes()
    with pytest.raises(ResultError, match="other settings"):
        run_phase_change(runs, tmp_path / "res", n_windows=8, progress=False)
    assert (res.dir / "provenance.json").read_bytes() == prov
    shutil.rmtree(finished / "checkpoints" / "step-00000019")  # the run changed: fewer checkpoints
    res = run_phase_change(runs, tmp_path / "res", n_windows=4, progress=False)
    assert len(res.read("checkpoints")) == n_before - 1


# ----------------------------------------------------------------------------- 5. advice that works

def test_nan_guard_keeps_only_finite_checkpoints_and_lr_resume_works(tmp_path, capsys):
    """lr=1e30: training stops; every kept checkpoint has finite weights and a finite validation
    loss; the advice (--resume --lr <lower>) works and is recorded in the run."""
    out = tmp_path / "run"
    code, err = cli(train_argv(out, "--lr", "1e30"), capsys)
    assert code == 1 and "--resume --lr" in err and "Traceback" not in err, err
    for ckpt in T.list_checkpoints(out):
        model = T.load_model(ckpt)
        assert all(torch.isfinite(p).all() for p in model.parameters()), ckpt
    assert all(np.isfinite(m["val_loss"]) for m in T.read_metrics(out))
    code, err = cli(train_argv(out, "--resume", "--lr", "1e-2"), capsys)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["lr"] == 1e-2
    change = json.loads((out / "lr_changes.jsonl").read_text().splitlines()[-1])
    assert change["lr_before"] == 1e30 and change["lr"] == 1e-2
    assert T.latest_checkpoint(out).name == "step-00000019"
    code, err = cli(train_argv(out, "--resume", "--lr", "1e-2", "--seed", "1"), capsys)
    assert code == 2 and "different run" in err and "seed" in err, err  # only lr may change


def test_resume_without_lr_keeps_the_lowered_lr(tmp_path, capsys):
    """After `--resume --lr <lower>` and a kill, a plain `--resume` (README: "--resume after a kill") goes on
    at the lowered lr: it used to take the preset's lr back (the one that diverged) and record that as a
    change, with nothing said."""
    from experiments.__main__ import build_parser, train_config_from_args

    out = tmp_path / "run"
    cfg = train_config_from_args(build_parser().parse_args([str(a) for a in train_argv(out)]))
    T.train(cfg, out, progress=False, stop_after_steps=5)
    lowered = T.TrainConfig.from_dict({**cfg.to_dict(), "lr": cfg.lr / 4})
    T.train(lowered, out, resume=True, progress=False, stop_after_steps=5)  # `--resume --lr`, killed again
    code, err = cli(train_argv(out, "--resume"), capsys)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["lr"] == cfg.lr / 4
    assert len((out / "lr_changes.jsonl").read_text().splitlines()) == 1
    late = [m for m in T.read_metrics(out) if m["step"] > 10]
    assert late and all(m["lr"] == pytest.approx(T.lr_at(m["step"] - 1, lowered)) for m in late), late


def test_ctrl_c_in_reproduce_advice_works(tmp_path, capsys, monkeypatch):
    """Ctrl-C during `reproduce` exits 130 advising to rerun the same command (which resumes; it takes
    no --resume option)."""
    import experiments.reproduce as R

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "reproduce", interrupted)
    code, err = cli(["reproduce", "--scale", "tiny", "--out", tmp_path / "r"], capsys)
    assert code == 130 and "rerun the same command" in err and "--resume" not in err, err
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:  # the advice must not be an option reproduce refuses
        cli_main(["reproduce", "--scale", "tiny", "--out", str(tmp_path / "r"), "--resume"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- 6. exit codes

@pytest.mark.parametrize("failure, code, message", [
    (OSError(28, "No space left on device", "/x/metrics.jsonl"), 1, "disk is full"),
    (OSError(30, "Read-only file system", "/x"), 1, "read-only"),
    (MemoryError(), 1, "out of memory"),
])
def test_environment_failures_give_one_line(failure, code, message, tmp_path, capsys, monkeypatch):
    """Disk full, read-only, out of memory: one line, no traceback, a non-2 exit code."""
    import interventions.zoo.train as TT

    def fail(*a, **k):
        raise failure

    monkeypatch.setattr(TT, "train", fail)
    got, err = cli(train_argv(tmp_path / "out"), capsys)
    assert got == code and message in err and len(err.strip().splitlines()) == 1, err


def test_a_bug_raises_with_a_traceback_not_exit_2(tmp_path, monkeypatch, reference):
    """An experiment that fails with a plain ValueError (a bug) is not mapped to exit code 2."""
    import experiments.phase_change as P

    def buggy(*a, **k):
        raise ValueError("a bug")

    monkeypatch.setattr(P, "run_phase_change", buggy)
    with pytest.raises(ValueError, match="a bug"):
        cli_main(["phase-change", str(reference), "--out", str(tmp_path / "r"), "--quiet"])


PRE_IMPORT = r'''
import sys
from experiments.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print(e.code, "torch" in sys.modules)
'''


def test_run_folders_are_named_by_one_helper(tmp_path):
    """One stdlib helper, ``experiments.naming.folder_name``, names a run or model folder by its own name
    (``.`` and ``..`` resolved) for the CLI (usage check and the runs it passes on), ``training_log`` and
    ``survey`` (each had its own copy of ``Path(os.path.abspath(x)).name``); the CLI imports it before torch:
    ``--help`` and a usage error for two runs of one name still exit without importing torch."""
    from experiments import training_log
    from experiments.__main__ import _runs
    from experiments.naming import folder_name
    from experiments.survey import model_labels

    code = [p.relative_to(REPO).as_posix() for d in ("experiments", "interventions")
            for p in sorted((REPO / d).rglob("*.py")) if "abspath" in p.read_text()]
    assert code == ["experiments/naming.py"]
    for d in ("a", "b"):
        (tmp_path / d / "run").mkdir(parents=True)
        (tmp_path / d / "run" / "train_config.json").write_text("{}")
    dot, up = str(tmp_path / "a" / "run" / "."), str(tmp_path / "a" / "run" / "..")
    assert folder_name(dot) == "run" and folder_name(up) == "a"
    assert list(_runs([dot])) == ["run"] and model_labels([dot, up]) == {"run": dot, "a": up}
    with pytest.raises(SystemExit) as e:
        training_log.main([dot, str(tmp_path / "b" / "run"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    dup = subprocess.run([sys.executable, "-c", PRE_IMPORT, "phase-change", dot, str(tmp_path / "b" / "run"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert dup.stdout.split() == ["2", "False"] and "two run folders are named run" in dup.stderr, dup.stderr
    usage = subprocess.run([sys.executable, "-c", PRE_IMPORT, "--help"], capture_output=True, text=True, cwd=REPO,
                           env=ENV, timeout=120)
    assert usage.stdout.splitlines()[-1] == "0 False", usage.stdout[-500:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "tiny", "--out", "{tmp}/file"], "is a file"),
    (["train", "--preset", "nope", "--out", "{tmp}/x"], "unknown preset"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--corpus", "{tmp}/missing"], "does not exist"),
    (["train", "--preset", "tiny", "--out", "{tmp}/x", "--device", "tpu"], "not a known device"),
    (["phase-change", "{tmp}/norun", "--out", "{tmp}/x"], "not a training run folder"),
    (["phase-change", "{tmp}/norun", "--out", "{tmp}/x", "--windows", "0"], "positive integer"),
    (["ablations", "{tmp}/norun", "--out", "{tmp}/x", "--windows", "-3"], "positive integer"),
    (["ablations", "{tmp}/norun", "--out", "{tmp}/x", "--windows", "3"], "at least 8"),
    (["reproduce", "--out", "{tmp}/x", "--seeds", "100000000000000000000"], "at most 1000"),
    (["figures", "--results", "{tmp}/file"], "is a file"),
    (["figures", "--results", "{tmp}/none", "--out", "{tmp}/fig"], "no result tables"),
    (["report", "--results", "{tmp}/none"], "no phase-change results"),
])
def test_usage_errors_come_before_heavy_imports(argv, message, tmp_path):
    """Usage errors exit 2 with one line, before torch is imported, leaving no folder."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "norun").mkdir()
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", PRE_IMPORT, *[a.format(tmp=tmp_path) for a in argv]],
                         capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert res.stdout.split() == ["2", "False"], (res.stdout, res.stderr)
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert snapshot(tmp_path) == before
    assert time.monotonic() - t0 < 60


def test_ablations_refuse_too_few_windows(tmp_path):
    """The per-head sweeps run on a quarter (zero, mean) and a half (pattern) of the windows: with fewer
    than 8, a sweep got no window (a traceback after the provenance was written) or one (a bootstrap
    s.e. of exactly 0 for its share). Refused, naming the option, before the tables' folder exists."""
    from experiments.ablations import run_ablations
    from experiments.common import InputError

    for n in (1, 3, 4, 7):
        with pytest.raises(InputError, match="at least 8"):
            run_ablations(tmp_path / "run", "run", None, tmp_path / "res", n_windows=n, progress=False)
    assert not (tmp_path / "res" / "ablations_run").exists()


def test_ablations_and_circuit_resume_with_the_run_folder_spelled_another_way(finished, tmp_path, monkeypatch):
    """The same run folder named by another path (`reproduce --out results/default` after `--out
    /abs/.../results/default`, or from another working directory) is the same job: the finished ablations
    are skipped and an unfinished circuit resumes. The run's path is part of their settings, so it was
    refused as "results made with other settings (differing: ['run'])", after the phase change had run.
    Another run folder is still refused over their tables."""
    import experiments.phase_change as P
    from experiments.ablations import run_ablations
    from experiments.circuit import run_circuit

    res = tmp_path / "res"
    pc = P.run_phase_change({"run": finished}, res, n_windows=4, progress=False, workers=1, n_precise=8,
                            n_pca_pairs=16)
    run_ablations(finished, "run", None, res, n_windows=8, progress=False)
    run_circuit(finished, "run", pc.read("head_scores"), res, n_prompts=2)
    abl = (res / "ablations_run" / "sets.csv").read_bytes()
    (res / "circuit_run" / "path_patch.csv").unlink()  # a circuit interrupted before its last table
    monkeypatch.chdir(tmp_path)
    run_ablations(Path("run"), "run", None, Path("res"), n_windows=8, progress=False)
    run_circuit(Path("run"), "run", pc.read("head_scores"), Path("res"), n_prompts=2)
    assert (res / "ablations_run" / "sets.csv").read_bytes() == abl
    assert Results(res, "circuit_run").has("path_patch")
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    with pytest.raises(ResultError, match="other settings"):
        run_ablations(other, "run", None, res, n_windows=8, progress=False)
    assert (res / "ablations_run" / "sets.csv").read_bytes() == abl


def test_a_moved_results_folder_keeps_its_run_setting(tmp_path):
    """A results folder moved with its runs (`mv results/a results/b`): the recorded run folder is gone, and
    `reproduce --out results/b` was refused as "other settings (differing: ['run'])" over the finished ablations,
    advising to delete them. Now a recorded folder that no longer exists is this one when the tables were made
    from this run's content; another run (other content) is still refused."""
    from experiments.common import run_fingerprint, run_setting

    old = tmp_path / "a" / "runs" / "m"
    old.mkdir(parents=True)
    (old / "train_config.json").write_text('{"seed": 0}')
    res = Results(tmp_path / "a", "ablations_m")
    res.write_provenance({"run": run_setting(res, old)})
    res.write("sets", pd.DataFrame({"x": [1]}), inputs={"run": run_fingerprint(old)})
    (tmp_path / "a").rename(tmp_path / "b")
    moved, res = tmp_path / "b" / "runs" / "m", Results(tmp_path / "b", "ablations_m")
    assert run_setting(res, moved) == str(old)
    res.write_provenance({"run": run_setting(res, moved)})  # not refused
    (moved / "train_config.json").write_text('{"seed": 1}')  # another run in its place
    assert run_setting(res, moved) == str(moved)
    with pytest.raises(ResultError, match="other settings"):
        res.write_provenance({"run": run_setting(res, moved)})


def test_ablation_sets_compare_with_a_clean_run_on_the_same_path():
    """The head sets' losses and their clean baseline come from one attention path (observable's eager, which
    pattern preservation needs): in bfloat16 a set whose heads write nothing (output-projection columns 0)
    changes no loss, exactly, and the clean losses are the eager run's. The clean run was on SDPA: the
    "change" of such a set was up to 0.5 nats on a token."""
    from experiments.ablations import set_losses
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, observable, per_token_loss

    torch.manual_seed(0)
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=64, n_ctx=64, vocab_size=257)).eval()
    with torch.no_grad():
        for p in model.parameters():  # large weights: bfloat16 rounding differs between the paths
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        model.transformer.h[1].attn.c_proj.weight[:, :16] = 0  # head L1H0 writes nothing
    model = model.to(torch.bfloat16)
    windows = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(2))
    losses = set_losses(model, windows, {"clean": [], "silent": ["L1H0"]})
    with observable(model):
        eager = per_token_loss(model, windows)
    assert torch.equal(losses["clean"], eager)
    assert torch.equal(losses["silent"], losses["clean"])
    assert (per_token_loss(model, windows) - eager).abs().max() > 0.01  # the paths do differ here


def test_run_without_checkpoints_names_the_run(tmp_path, capsys):
    """phase-change on a run with no complete checkpoint: exit 2 naming the run, not a pandas error, and
    nothing written (it wrote the results folder's provenance.json and manifest first: an invocation
    recorded for tables it never made)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(tiny_cfg().to_dict()))
    code, err = cli(["phase-change", run, "--out", tmp_path / "res", "--windows", "4", "--quiet"], capsys)
    assert code == 2 and str(run) in err and "no complete checkpoint" in err, err
    assert not (tmp_path / "res" / "phase_change").exists()


def test_garbled_train_config_names_the_file(tmp_path, capsys):
    """A garbled train_config.json: `train --resume` and `phase-change` exit 2 naming the file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{garbled")
    code, err = cli(train_argv(run, "--resume"), capsys)
    assert code == 2 and str(run / "train_config.json") in err, err
    code, err = cli(["phase-change", run, "--out", tmp_path / "res", "--quiet"], capsys)
    assert code == 2 and str(run / "train_config.json") in err, err


# ----------------------------------------------------------------------------- 7. safetensors

def test_hub_models_load_only_safetensors_unless_opted_in(monkeypatch):
    """Hub models are asked for with use_safetensors=True; a pickle-only model is refused naming the
    opt-in (--allow-pickle), and the opt-in loads it."""
    import transformers

    from experiments.survey import load_any

    calls = []

    class Dummy(torch.nn.Module):
        def to(self, device):
            return self

    def fake(spec, **kw):
        calls.append(kw)
        if kw.get("use_safetensors"):
            raise OSError(f"{spec} does not appear to have a file named model.safetensors")
        return Dummy()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(InputError, match="--allow-pickle"):
        load_any("org/pickle-only")
    assert calls[-1]["use_safetensors"] is True
    assert isinstance(load_any("org/pickle-only", allow_pickle=True), Dummy)
    assert calls[-1]["use_safetensors"] is False


# ----------------------------------------------------------------------------- 8. duplicate ablations

def test_duplicate_or_conflicting_ablations_on_one_head_raise(tiny_model):
    """Two ablations of one head (same or different kinds, or a head listed twice) raise ValueError
    naming the head before any work."""
    import interventions as iv

    tokens = torch.randint(0, 50, (2, 8))
    for abl in ([iv.ZeroAblation("L1H0"), iv.MeanAblation("L1H0", tokens)],
                [iv.ZeroAblation("L1H0"), iv.ZeroAblation(["L0H1", "L1H0"])],
                [iv.ZeroAblation(["L1H0", "L1H0"])],
                [iv.PatternPreserving(iv.ZeroAblation("L1H0")), iv.ResampleAblation("L1H0", tokens)]):
        with pytest.raises(ValueError, match="head L1H0 is ablated more than once"):
            iv.run_with_ablations(tiny_model, tokens, abl)


def test_interrupted_evaluation_resumes_after_the_last_model_written(finished, tmp_path, monkeypatch):
    """Each model's checkpoint tables are written as soon as its checkpoints are evaluated: a failure
    in the second model keeps the first's, and the re-run evaluates only the second."""
    import experiments.phase_change as P

    other = tmp_path / "other"
    shutil.copytree(finished, other)
    runs = {"a": finished, "b": other}
    real = P._eval_chunk
    seen = []

    def failing(job):
        if job[0] == str(other):
            raise RuntimeError("interrupted")
        return real(job)

    monkeypatch.setattr(P, "_eval_chunk", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        P.run_phase_change(runs, tmp_path / "res", n_windows=4, progress=False, workers=1)
    res = Results(tmp_path / "res", "phase_change")
    assert len(res.read("checkpoints_a")) > 0 and res.read_optional("checkpoints_b") is None

    def counting(job):
        seen.append(job[0])
        return real(job)

    monkeypatch.setattr(P, "_eval_chunk", counting)
    P.run_phase_change(runs, tmp_path / "res", n_windows=4, progress=False, workers=1)
    assert seen and set(seen) == {str(other)}
    assert set(res.read("checkpoints").model) == {"a", "b"}


def test_workers_1_trains_and_evaluates_with_one_thread_as_the_parallel_workers_do(finished, tmp_path, monkeypatch):
    """`reproduce --workers 1` trains and evaluates in this process, with the one torch thread of the
    parallel workers: more threads change every number after the first step, so `--workers 1` gave other
    results than the default, and a run resumed with another --workers than it started with differed from
    one not interrupted. The caller's thread count is restored after."""
    import experiments.phase_change as P
    from experiments import zoo

    seen = []
    monkeypatch.setattr(zoo, "train", lambda *a, **k: seen.append(("train", torch.get_num_threads())))
    real = P.head_score_rows
    monkeypatch.setattr(P, "head_score_rows",
                        lambda *a, **k: seen.append(("evaluate", torch.get_num_threads())) or real(*a, **k))
    monkeypatch.setitem(zoo.SCALES, "tiny", {"attn-1l": TOKENS})
    caller = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        zoo.train_zoo("tiny", tmp_path / "runs", progress=False, workers=1)
        P.run_phase_change({"a": finished}, tmp_path / "res", n_windows=4, progress=False, workers=1, n_precise=8,
                           n_pca_pairs=16)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(caller)
    assert {what for what, _ in seen} == {"train", "evaluate"} and {n for _, n in seen} == {1}, seen


def test_report_on_a_reproduction_stopped_before_its_tables_names_the_command(tmp_path, capsys):
    """`report` on the folder of a `reproduce` interrupted right after training (the phase change's
    provenance written, none of its tables): exit 2 advising to run `reproduce --out` to completion, nothing
    written. It said "checkpoints.csv is missing: run the experiment that writes it first", naming no command."""
    out = tmp_path / "res"
    Results(out, "phase_change").write_provenance({"n_windows": 4})
    Results(out, "report").write_json("timings", [{"complete": False, "train_s": 1.0, "total_s": 1.0}])
    before = snapshot(tmp_path)
    code, err = cli(["report", "--results", out], capsys)
    assert code == 2 and f"reproduce --out {out}" in err, err
    assert snapshot(tmp_path) == before


def test_reproduce_refuses_a_bad_corpus_or_seeds_before_making_the_folder(tmp_path, capsys):
    """--corpus on the tiny scale, a --corpus path that does not exist and --seeds 0: exit 2, one line
    naming the fix, and no results folder."""
    for argv, words in ((["--scale", "tiny", "--corpus", str(tmp_path)], "tiny scale"),
                        (["--scale", "cpu", "--corpus", str(tmp_path / "missing")], "does not exist"),
                        (["--scale", "tiny", "--seeds", "0"], "positive")):
        code, err = cli(["reproduce", "--out", tmp_path / "r", *argv], capsys)
        assert code == 2 and words in err, (argv, err)
        assert not (tmp_path / "r").exists()


def test_reproduce_refuses_a_finished_run_trained_with_other_options(tmp_path, monkeypatch):
    """A finished run in ``runs/`` whose saved config differs from the one asked for (here the corpus,
    as ``reproduce --corpus B`` after ``--corpus A``: same step count, so it looks finished) is refused
    with a ``RunFolderError`` naming the option, never reused as if it were the asked-for run."""
    from experiments import zoo

    monkeypatch.setitem(zoo.SCALES, "tiny", {"attn-1l": TOKENS})
    runs = zoo.train_zoo("tiny", tmp_path / "runs", progress=False, workers=1)
    before = final_bytes(runs["attn-1l"])
    assert zoo.train_zoo("tiny", tmp_path / "runs", progress=False, workers=1) == runs  # same options: skipped
    real = zoo.get_preset
    monkeypatch.setattr(zoo, "get_preset", lambda name: {**real(name), "corpus": "synthetic:markov"})
    with pytest.raises(T.RunFolderError, match="corpus"):
        zoo.train_zoo("tiny", tmp_path / "runs", progress=False, workers=1)
    assert final_bytes(runs["attn-1l"]) == before


def test_a_finished_run_missing_a_metrics_line_is_resumed_and_the_line_recomputed(tmp_path, monkeypatch):
    """A finished run whose metrics.jsonl lost a line from the middle (a checkpoint's) is not taken as
    finished: train_zoo resumes it, and the line comes back equal to an uninterrupted run's."""
    from experiments import zoo

    monkeypatch.setitem(zoo.SCALES, "tiny", {"attn-1l": TOKENS})
    run = zoo.train_zoo("tiny", tmp_path / "runs", progress=False, workers=1)["attn-1l"]
    path = run / "metrics.jsonl"
    full = path.read_text().splitlines()
    steps = [int(c.name.split("-")[1]) for c in T.list_checkpoints(run)]
    gone = next(i for i, line in enumerate(full) if json.loads(line)["step"] == steps[len(steps) // 2])
    path.write_text("\n".join(full[:gone] + full[gone + 1:]) + "\n")
    zoo.train_zoo("tiny", tmp_path / "runs", progress=False, workers=1)
    again = path.read_text().splitlines()
    assert [json.loads(x)["step"] for x in again] == [json.loads(x)["step"] for x in full]
    assert json.loads(again[gone])["val_loss"] == json.loads(full[gone])["val_loss"]


def test_phase_change_refuses_two_runs_of_one_name(tmp_path, capsys, reference):
    """`phase-change a/run b/run`: the tables are keyed by the run folder's name, so two folders of one name
    exit 2 naming it before any work (no results folder), never evaluate one of them silently."""
    runs = [tmp_path / d / "run" for d in ("a", "b")]
    for r in runs:
        shutil.copytree(reference, r, ignore=shutil.ignore_patterns(".lock"))
    code, err = cli(["phase-change", *runs, "--out", tmp_path / "res", "--windows", "4", "--quiet"], capsys)
    assert code == 2 and "run" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "res").exists()


def test_ablations_and_circuit_refuse_phase_change_results_of_another_run_state(tmp_path, capsys, finished):
    """`ablations` / `circuit` read the head scores and ICL window of `phase-change` in --out: made from
    another state of the run (here: before its last checkpoint was removed), they are refused (exit 2,
    naming phase-change) rather than used for the run's other final checkpoint; rerunning phase-change,
    as advised, makes them run."""
    res = tmp_path / "res"
    assert cli(["phase-change", finished, "--out", res, "--windows", "4", "--quiet"], capsys)[0] == 0
    shutil.rmtree(max((finished / "checkpoints").glob("step-*")))
    for argv in (["circuit", finished, "--out", res], ["ablations", finished, "--out", res, "--windows", "8", "--quiet"]):
        code, err = cli(argv, capsys)
        assert code == 2 and "phase-change" in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (res / "circuit_run").exists() and not (res / "ablations_run").exists()
    assert cli(["phase-change", finished, "--out", res, "--windows", "4", "--quiet"], capsys)[0] == 0
    assert cli(["circuit", finished, "--out", res], capsys)[0] == 0


def test_reproduce_api_refuses_bad_input_before_making_the_folder(tmp_path):
    """reproduce() called directly with --corpus on the tiny scale, a missing corpus, seeds=0 or an unknown
    scale raises before the results folder (or its lock file) exists; so does a figures folder whose
    manifest is damaged (it was found only after the whole job, when the figures were drawn)."""
    from experiments.common import ResultError
    from experiments.figures import DRAWN
    from experiments.reproduce import reproduce

    for kw in (dict(scale="tiny", corpus=str(tmp_path)), dict(scale="cpu", corpus=str(tmp_path / "missing")),
               dict(scale="tiny", seeds=0), dict(scale="bogus")):
        with pytest.raises(ValueError):
            reproduce(out=tmp_path / "r", progress=False, **kw)
        assert not (tmp_path / "r").exists(), kw
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / DRAWN).write_text("[]")
    with pytest.raises(ResultError, match="delete it"):
        reproduce(out=tmp_path / "r", scale="tiny", progress=False, figures_dir=tmp_path / "figs")
    assert not (tmp_path / "r").exists()


def test_model_labels_read_back_as_written(tmp_path):
    """A table's model labels come back as the text written: folders named "1" and "01" (or "NA") are
    two models, not one 1.0 (or a NaN); empty cells still read as NaN."""
    from experiments.common import Results

    res = Results(tmp_path, "survey")
    res.write("t", pd.DataFrame({"model": ["1", "01", "NA", "attn-2l"], "score": [0.5, float("nan"), 0.3, 1.0]}))
    back = res.read("t")
    assert back.model.tolist() == ["1", "01", "NA", "attn-2l"]
    assert np.isnan(back.score[1]) and back.score[0] == 0.5


def test_a_rerun_keeps_the_provenance_of_the_tables_it_did_not_make(tmp_path, monkeypatch):
    """A rerun with the same settings at another commit that skips every finished table kept rewriting
    provenance.json, so the report named its commit and machine for tables it did not make. Now the
    record is kept, the rerun is appended to ``invocations``, each table names the invocation that made
    it (``made_by``), and the report says which commits computed the tables."""
    import experiments.common as common
    from experiments.reproduce import _made_by_note
    from interventions.zoo.provenance import provenance as real

    def at(commit):
        monkeypatch.setattr(common, "provenance", lambda **kw: {**real(**kw), "git": {"commit": commit, "dirty": False}})

    res = Results(tmp_path, "phase_change")
    at("a" * 40)
    res.write_provenance({"n_windows": 64})
    res.write("checkpoints", pd.DataFrame({"x": [1]}))
    at("b" * 40)
    Results(tmp_path, "phase_change").write_provenance({"n_windows": 64})  # the rerun: every table skipped
    prov = res.read_provenance()
    assert prov["git"]["commit"] == "a" * 40 and [i["git"]["commit"][0] for i in prov["invocations"]] == ["a", "b"]
    assert [i["git"]["commit"][0] for i in res.made_by()] == ["a"]
    res.write("windows", pd.DataFrame({"y": [2]}))  # the rerun recomputes one table
    assert [i["git"]["commit"][0] for i in res.made_by()] == ["a", "b"]
    machine = "m, 2 threads, GPU: none"
    made = [{"git_commit": "a" * 40, "machine": machine, "folders": ["phase_change"]}]
    assert _made_by_note({"git_commit": "a" * 40, "machine": machine, "tables_made_by": made}) == ""
    assert "commit aaaaaaa on m" in _made_by_note({"git_commit": "b" * 40, "machine": machine, "tables_made_by": made})


def test_a_rerun_on_other_runs_names_them_at_the_top_of_the_provenance(tmp_path):
    """``phase-change`` on runs a, then (same settings) on run b: the tables over all runs are rewritten from
    b, so the record's top-level ``runs`` names b (it kept a's, the first invocation's); each invocation keeps
    its own, and the first invocation's machine and commit stay at the top (the tables they made)."""
    res = Results(tmp_path, "phase_change")
    res.write_provenance({"n_windows": 64}, runs={"attn-1l": "/x/attn-1l"})
    res.write("checkpoints", pd.DataFrame({"x": [1]}))
    first = res.read_provenance()
    Results(tmp_path, "phase_change").write_provenance({"n_windows": 64}, runs={"attn-2l": "/y/attn-2l"})
    prov = res.read_provenance()
    assert prov["runs"] == {"attn-2l": "/y/attn-2l"}
    assert [i["runs"] for i in prov["invocations"]] == [{"attn-1l": "/x/attn-1l"}, {"attn-2l": "/y/attn-2l"}]
    assert prov["created"] == first["created"] and prov["git"] == first["git"]


def test_an_interrupted_figure_save_keeps_the_previous_figure_whole(tmp_path, monkeypatch):
    """A save killed mid-write (here: the PDF backend raising) leaves the earlier PNG/PDF as they were
    and no temporary file: figures are written via a temporary file and a rename."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from experiments import figures

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = figures.save_figure(fig, tmp_path, "curve")
    before = {p.name: p.read_bytes() for p in paths}
    assert all(before.values())

    real = Figure.savefig

    def dies_on_pdf(self, fname, *args, **kwargs):
        if kwargs.get("format") == "pdf" or str(fname).endswith(".pdf"):
            Path(fname).write_bytes(b"%PDF-half")  # what a kill mid-write leaves behind
            raise KeyboardInterrupt
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", dies_on_pdf)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with pytest.raises(KeyboardInterrupt):
        figures.save_figure(fig, tmp_path, "curve")
    plt.close(fig)
    assert (tmp_path / "curve.pdf").read_bytes() == before["curve.pdf"]  # the old PDF, whole
    assert (tmp_path / "curve.png").read_bytes() != before["curve.png"]  # the PNG finished: the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.pdf", "curve.png"]  # no temporary left


def test_a_corpus_edited_after_training_is_refused_before_evaluation(tmp_path, monkeypatch):
    """Evaluation windows come from the corpus as it is now: a corpus edited after a run was trained would
    give results that belong to no training run, and cached tables keyed on the run would silently
    disagree with a recomputation. phase-change refuses it before anything is written, and so does the
    ablations experiment; the unedited corpus passes."""
    from experiments.common import ResultError
    from experiments.phase_change import check_corpora, run_phase_change, run_source
    from interventions.zoo import train as T

    monkeypatch.setenv("INTERVENTIONS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text(f"file {i}: " + "abcdefgh " * 200)
    cfg = T.TrainConfig.from_dict(dict(corpus=str(corpus), vocab_size=257, batch_size=4, tokens=32 * 4 * 2,
                                       n_checkpoints=1, n_eval_windows=4,
                                       model=dict(n_layers=1, n_heads=2, d_model=16, n_ctx=32)))
    run = tmp_path / "attn-1l"
    T.train(cfg, run, progress=False)
    check_corpora({"attn-1l": run})  # unedited: passes
    assert run_source(run) is not None
    (corpus / "f2.txt").write_text("file 2: " + "zyxwvu " * 200)
    with pytest.raises(ResultError, match="corpus .* has changed since .* was trained"):
        run_phase_change({"attn-1l": run}, tmp_path / "results", progress=False, workers=1)
    assert not (tmp_path / "results" / "phase_change").exists()  # no table, no provenance (only the folder's lock)
    with pytest.raises(ResultError, match="has changed since"):
        run_source(run)


def test_disk_full_inside_safetensors_gives_one_line(tmp_path, capsys, monkeypatch):
    """A full disk while a checkpoint is written surfaces from safetensors as a ``SafetensorError`` ("... (os
    error 28)"), not an OSError: it gave a traceback (seen on a full dev disk). Now the one line of an
    environment failure, exit 1, naming the checkpoint folder; a safetensors error without an OS error is
    still a bug (traceback)."""
    from safetensors import SafetensorError

    import interventions.zoo.train as TT

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(TT, "save_file", full)
    got, err = cli(train_argv(tmp_path / "out"), capsys)
    assert got == 1 and "disk is full" in err and ".tmp-step-" in err and len(err.strip().splitlines()) == 1, err

    def other(*a, **k):
        raise SafetensorError("Error while serializing: a shape mismatch")

    monkeypatch.setattr(TT, "save_file", other)
    with pytest.raises(SafetensorError, match="shape mismatch"):
        cli_main(train_argv(tmp_path / "out2"))


def test_run_fingerprint_covers_the_runs_tokenizer(tmp_path):
    """The head scores read their probe tokens from a run's saved ``tokenizer/``: a tokenizer changed in
    place gives the run a new key, so tables keyed on it are recomputed, not served stale. A run without
    one (byte level) keeps its key."""
    from experiments.common import run_fingerprint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    bytes_only = run_fingerprint(run)
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    with_tok = run_fingerprint(run)
    (run / "tokenizer" / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    edited = run_fingerprint(run)
    assert len({bytes_only, with_tok, edited}) == 3
    (run / "tokenizer" / "README.md").write_text("notes")  # documentation changes no score
    assert run_fingerprint(run) == edited



def test_figures_leave_out_experiments_of_another_state_of_the_run(tmp_path, capsys, monkeypatch, finished):
    """`ablations` and `circuit` of a run, then the run retrained in place and `phase-change` run again into the
    same --out: `figures` drew the earlier run's ablation and circuit beside the new run's phase change as one
    run's (and the attribution under the new run's window). They are left out, named on stderr, until
    `ablations` / `circuit` are run again, as the line says."""
    import experiments.phase_change as P
    from experiments import figures
    from experiments.ablations import run_ablations
    from experiments.circuit import run_circuit

    monkeypatch.setattr(figures, "_save", empty_png)
    res, fig = tmp_path / "res", tmp_path / "fig"

    def evaluate():
        return P.run_phase_change({"run": finished}, res, n_windows=4, progress=False, workers=1, n_precise=8,
                                  n_pca_pairs=16)

    def experiments(pc):
        run_ablations(finished, "run", None, res, windows_table=pc.read("windows"), n_windows=8, progress=False)
        run_circuit(finished, "run", pc.read("head_scores"), res, n_prompts=2)

    def draw():
        figures.make_figures(res, fig)
        return sorted(p.stem for p in fig.glob("*.png")), capsys.readouterr().err

    experiments(evaluate())
    names, err = draw()
    assert "ablation_icl_share_run" in names and "patching_run" in names and "left out" not in err
    shutil.rmtree(finished)
    T.train(tiny_cfg(seed=1), finished, progress=False)  # retrained: another run in the same folder
    pc = evaluate()
    names, err = draw()
    assert "ablations_run is left out" in err and "circuit_run is left out" in err, err
    assert not [n for n in names if "ablation" in n or "patching" in n], names
    experiments(pc)
    names, err = draw()
    assert "ablation_icl_share_run" in names and "patching_run" in names and "left out" not in err


def test_figures_of_runs_shorter_than_the_loss_heatmap_draw_the_rest(tmp_path):
    """The loss-by-index heatmap is drawn from 100k tokens on: a run with fewer checkpoints there (a short run,
    as `train --tokens 20000`) made `figures` fail with an IndexError; that figure is left out instead."""
    from experiments.figures import fig_loss_heatmap

    lbi = pd.DataFrame({"model": "run", "token_index": [1, 2, 1, 2], "loss": [3.0, 2.0, 2.5, 1.5],
                        "tokens": [10_000, 10_000, 20_000, 20_000]})
    Results(tmp_path, "phase_change").write("loss_by_index", lbi)
    assert fig_loss_heatmap(tmp_path, tmp_path / "fig") == []
    assert not (tmp_path / "fig").exists()


def test_reproduce_refuses_a_run_of_other_options_before_writing(tmp_path, reference):
    """`reproduce --scale cpu --out X` after `--scale tiny --out X` (a run of the same name trained with other
    options) is refused, exit 2, as before, but it first wrote an interrupted invocation into
    report/timings.json (and took the folder's lock): bad input writes nothing."""
    from experiments.reproduce import reproduce

    out = tmp_path / "out"
    shutil.copytree(reference, out / "runs" / "attn-1l", ignore=shutil.ignore_patterns(".lock"))
    before = snapshot(out)
    with pytest.raises(T.RunFolderError, match="other options"):
        reproduce(out=out, scale="tiny", progress=False)
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_a_run_folder_named_by_dot_is_named_by_its_own_name(tmp_path, capsys, monkeypatch, finished):
    """`phase-change .` from inside a run folder: the run was named "" (``Path(".").name``), its tables
    ``checkpoints_.csv``, and the empty model label read back as NaN: a traceback after the tables were
    written. The folder's own name is used, as `survey` does; `ablations .` finds those results."""
    monkeypatch.chdir(finished)
    code, err = cli(["phase-change", ".", "--out", tmp_path / "res", "--windows", "4", "--quiet"], capsys)
    assert code == 0, err
    assert Results(tmp_path / "res", "phase_change").read("windows").model.tolist() == ["run"]
    assert cli(["circuit", ".", "--out", tmp_path / "res"], capsys)[0] == 0
    assert (tmp_path / "res" / "circuit_run").is_dir()


@pytest.mark.parametrize("key, entry", [("windows", 5), ("windows", [1]), ("windows", {"inputs": None}),
                                        ("windows", {"sha256": "0" * 64, "run": 5}), ("__settings__", 5),
                                        ("__settings__", "0" * 64)])
def test_an_edited_manifest_entry_is_refused_naming_the_folder(tmp_path, capsys, entry, key):
    """A manifest.json edited into valid JSON whose entries are not checksum records (a number, a list, a
    record without its checksum) made `figures` and `report` fail with a traceback (TypeError, KeyError,
    exit 1); it is a damaged result: exit 2, naming the folder to delete."""
    _phase_change_tables(tmp_path)
    path = tmp_path / "phase_change" / "manifest.json"
    m = json.loads(path.read_text())
    m[key] = entry
    path.write_text(json.dumps(m))
    code, err = cli(["figures", "--results", tmp_path, "--out", tmp_path / "figs"], capsys)
    assert code == 2 and "manifest.json is corrupted" in err and "delete the folder" in err, err
    assert not (tmp_path / "figs").exists()


def test_a_folder_whose_manifest_was_deleted_is_refused_not_left_out(tmp_path, capsys):
    """An experiment folder whose manifest.json was deleted still holds its tables: they were read as never
    written, so `report` dropped the ablation section (and `figures` its figures) without a word. They are
    unverifiable: exit 2 naming the folder to delete; deleting it, as advised, leaves the section out."""
    from experiments.reproduce import headline

    _phase_change_tables(tmp_path)
    Results(tmp_path, "ablations_attn-2l").write_provenance({"n_windows": 8})
    assert "ablation" in headline(tmp_path)
    (tmp_path / "ablations_attn-2l" / "manifest.json").unlink()
    with pytest.raises(ResultError, match="ablations_attn-2l"):
        headline(tmp_path)
    code, err = cli(["figures", "--results", tmp_path, "--out", tmp_path / "figs"], capsys)
    assert code == 2 and "delete the folder" in err and "ablations_attn-2l" in err, err
    assert not (tmp_path / "figs").exists()  # refused before the first figure
    shutil.rmtree(tmp_path / "ablations_attn-2l")
    assert "ablation" not in headline(tmp_path)


def test_report_timings_deleted_or_edited_name_the_folder_to_delete(tmp_path):
    """report/timings.json recorded but deleted was read as no invocation (the next reproduce counted only
    itself in the wall-clock); edited, the advice to delete the file led to that. Either is an error whose
    advice (delete the folder) works."""
    res = Results(tmp_path, "report")
    res.write_json("timings", [{"total_s": 5.0}])
    path = tmp_path / "report" / "timings.json"
    for damage in (lambda: path.write_text("[]"), path.unlink):
        damage()
        with pytest.raises(ResultError, match="delete the folder"):
            res.read_json("timings", default=[])
    shutil.rmtree(tmp_path / "report")
    assert res.read_json("timings", default=[]) == []


def test_tables_of_an_interrupted_phase_change_are_not_drawn_or_used(tmp_path, capsys, monkeypatch, finished):
    """`phase-change` of a run changed since its last one (here a checkpoint fewer), stopped after it wrote the
    run's checkpoint tables and before it derived the windows: `figures` drew the new checkpoints under the old
    windows, and `ablations` took the old windows as the run's. Both exit 2 until the phase change is rerun
    to completion, as the line says."""
    import experiments.phase_change as P
    from experiments import figures

    monkeypatch.setattr(figures, "_save", empty_png)
    res = tmp_path / "res"

    def evaluate():
        P.run_phase_change({"run": finished}, res, n_windows=4, progress=False, workers=1, n_precise=8, n_pca_pairs=16)

    evaluate()
    shutil.rmtree(max((finished / "checkpoints").glob("step-*")))

    def stopped(*a, **k):
        raise KeyboardInterrupt

    real = P.precise_icl
    monkeypatch.setattr(P, "precise_icl", stopped)
    with pytest.raises(KeyboardInterrupt):
        evaluate()
    for argv in (["figures", "--results", res, "--out", tmp_path / "fig"],
                 ["ablations", finished, "--out", res, "--windows", "8", "--quiet"]):
        code, err = cli(argv, capsys)
        assert code == 2 and "phase-change" in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "fig").exists() and not (res / "ablations_run").exists()
    monkeypatch.setattr(P, "precise_icl", real)
    evaluate()
    assert cli(["figures", "--results", res, "--out", tmp_path / "fig"], capsys)[0] == 0


def empty_png(fig, out, name):
    """A stand-in for ``experiments.figures._save``: no rendering, an empty ``NAME.png`` in ``out``."""
    import matplotlib.pyplot as plt

    plt.close(fig)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.png").write_bytes(b"")
    return [out / f"{name}.png"]
