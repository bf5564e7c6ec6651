"""Reliability: SIGKILL at many moments then --resume, atomic result tables, determinism, NaN guard
resume, and safe (pickle-free) loading.

The kill tests run each interrupted training as its own subprocess (all of them at once, to keep the
file fast on 2 cores) and resume it, so a kill really leaves whatever is on disk at that instant.
Every process that trains uses one thread, so weights can be compared byte for byte.
"""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments.__main__ import main as cli_main
from experiments.common import ResultError, Results
from experiments.presets import get_preset
from interventions.zoo import train as T

TOKENS = 60_000  # tiny preset: 58 steps of 1024 tokens, checkpoints at 1 2 3 6 10 18 32 58
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(REPO)}


def tiny_cfg(**over) -> T.TrainConfig:
    d = get_preset("tiny")
    d.update(tokens=TOKENS)
    d.update(over)
    return T.TrainConfig.from_dict(d)


pytestmark = pytest.mark.usefixtures("one_thread")


def final_bytes(run: Path) -> bytes:
    last = max((run / "checkpoints").glob("step-*"))
    return (last / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the tiny preset (the CLI's config for --tokens TOKENS)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    T.train(tiny_cfg(), run, progress=False)
    return run


# ----------------------------------------------------------------------------- kills

DRIVER = r'''
# Imports once, then forks one child per kill point (forking skips ~3 s of imports per child).
import os, signal, sys, json
import torch
torch.set_num_threads(1)
from interventions.zoo import train as T

root, cfg, points = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])


def arm(mode, n):
    count = {"n": 0}

    def hit():
        count["n"] += 1
        return count["n"] == n

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "save_file":          # optimizer.safetensors of a checkpoint (model already written)
        real_save = T.save_file
        def save_file(*a, **k):
            if hit():
                die()
            return real_save(*a, **k)
        T.save_file = save_file
    elif mode == "sha256":           # while the manifest's checksums are being computed
        real_sha = T.sha256_file
        def _sha256(p):
            if hit():
                die()
            return real_sha(p)
        T.sha256_file = _sha256
    elif mode in ("rename_before", "rename_after", "config_before"):
        real_replace = os.replace
        marker = "train_config" if mode == "config_before" else ".tmp-step-"
        def replace(src, dst, *a, **k):
            mine = marker in str(src)
            if mine and mode != "rename_after" and hit():
                die()
            real_replace(src, dst, *a, **k)
            if mine and mode == "rename_after" and hit():
                die()
        os.replace = replace
    elif mode == "adam_step":        # between checkpoints, right after the k-th optimizer step
        real_step = torch.optim.AdamW.step
        def step(self, *a, **k):
            r = real_step(self, *a, **k)
            if hit():
                die()
            return r
        torch.optim.AdamW.step = step
    else:
        raise SystemExit(f"unknown mode {mode}")


children = {}
for mode, n in points:
    pid = os.fork()
    if pid == 0:
        try:
            arm(mode, n)
            T.train(T.TrainConfig.from_dict(cfg), os.path.join(root, mode), progress=False)
            os._exit(0)  # finished without being killed
        except BaseException as e:
            print(f"{mode}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            os._exit(3)
    children[pid] = mode
status = {}
for _ in children:
    pid, st = os.wait()
    status[children[pid]] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
print(json.dumps(status))
'''

# name -> (driver mode, n-th call to kill at, latest complete checkpoint expected afterwards)
KILLS = {
    "during checkpoint write: optimizer file": ("save_file", 4, 3),        # checkpoint 6 half written
    "during checkpoint write: manifest sha256": ("sha256", 5 * 4 + 2, 6),  # 5 files per ckpt: 5th (step 10)
    "checkpoint complete, before its rename": ("rename_before", 6, 10),    # step 18 never renamed
    "right after a checkpoint's rename": ("rename_after", 5, 10),          # step 10 on disk, metrics?
    "between checkpoints (after optimizer step 25)": ("adam_step", 25, 18),
    "at start-up, before train_config.json": ("config_before", 1, None),
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, reference) -> dict:
    """Run every kill point (forked from one driver process), and at the same time a real CLI run
    killed by a timer at a random moment after its 4th checkpoint; wait for all."""
    root = tmp_path_factory.mktemp("kills")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    points = json.dumps([[mode, n] for mode, n, _ in KILLS.values()])
    drv = subprocess.Popen([sys.executable, str(driver), str(root), json.dumps(tiny_cfg().to_dict()), points],
                           env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer_out = root / "timer"
    cli = subprocess.Popen([sys.executable, "-m", "experiments", "train", "--preset", "tiny", "--out",
                            str(timer_out), "--tokens", str(TOKENS), "--quiet"], env=ENV, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    delay = random.uniform(0.0, 0.3)
    deadline = time.monotonic() + 120
    while not (timer_out / "checkpoints" / "step-00000006").exists():
        assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()
        time.sleep(0.005)
    time.sleep(delay)
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    so, se = drv.communicate(timeout=180)
    assert drv.returncode == 0, se
    status = json.loads(so.strip().splitlines()[-1])
    results = {"timer": (timer_out, cli.returncode, f"killed {delay:.3f}s after step 6 appeared")}
    for name, (mode, _, _) in KILLS.items():
        results[name] = (root / mode, status[mode], se)
    return results


@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_then_resume_is_bit_identical(name, killed, reference, capsys):
    """SIGKILL at this moment, then `train --resume` (CLI entry point): training continues from the
    last complete checkpoint (half-written ones are never used) and ends with the same
    model.safetensors bytes and the same metrics.jsonl as an uninterrupted run."""
    mode, _, expect_step = KILLS[name]
    out, rc, log = killed[name]
    assert rc == -signal.SIGKILL, f"the kill point was not reached (rc {rc}): {log[-2000:]}"
    latest = T.latest_checkpoint(out)
    assert (None if latest is None else int(latest.name.split("-")[1])) == expect_step
    if mode in ("save_file", "sha256"):  # the half-written checkpoint exists only under its temp name
        assert list((out / "checkpoints").glob(".tmp-step-*")), "expected a half-written temp checkpoint"
    code = cli_main(["train", "--preset", "tiny", "--out", str(out), "--tokens", str(TOKENS), "--quiet",
                     "--resume"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 58
    assert final_bytes(out) == final_bytes(reference)
    assert T.read_metrics(out) == T.read_metrics(reference)
    assert not list((out / "checkpoints").glob(".tmp-step-*")), "temp checkpoint left behind"
    assert [p.name for p in T.list_checkpoints(out)] == [p.name for p in T.list_checkpoints(reference)]


def test_timer_sigkill_of_cli_then_cli_resume(killed, reference):
    """A CLI run SIGKILLed from outside at a random moment resumes with the CLI's --resume (a real
    subprocess) and ends bit-identical to an uninterrupted run."""
    out, rc, when = killed["timer"]
    assert rc == -signal.SIGKILL, when
    assert T.latest_checkpoint(out) is not None
    res = subprocess.run([sys.executable, "-m", "experiments", "train", "--preset", "tiny", "--out", str(out),
                          "--tokens", str(TOKENS), "--quiet", "--resume"], check=False, env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert final_bytes(out) == final_bytes(reference), when
    assert T.read_metrics(out) == T.read_metrics(reference), when


def test_kill_during_resume_then_resume_again(tmp_path, reference):
    """A run interrupted twice (the second time while resuming) still ends bit-identical."""
    run = tmp_path / "r"
    T.train(tiny_cfg(), run, progress=False, stop_after_steps=7)
    T.train(tiny_cfg(), run, progress=False, resume=True, stop_after_steps=20)  # from 6 to 26
    assert T.latest_checkpoint(run).name == "step-00000018"
    T.train(tiny_cfg(), run, progress=False, resume=True)
    assert final_bytes(run) == final_bytes(reference)


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_different_seed_different_weights(tmp_path, reference):
    """Same seed and config on CPU: identical metrics.jsonl values and identical bytes of every
    checkpoint file; a different seed gives different weights."""
    T.train(tiny_cfg(), tmp_path / "again", progress=False)
    assert T.read_metrics(tmp_path / "again") == T.read_metrics(reference)
    for a in T.list_checkpoints(reference):
        b = tmp_path / "again" / "checkpoints" / a.name
        for f in ("model.safetensors", "optimizer.safetensors", "trainer_state.json", "manifest.json"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{a.name}/{f}"
    T.train(tiny_cfg(seed=1), tmp_path / "seed1", progress=False)
    assert final_bytes(tmp_path / "seed1") != final_bytes(reference)
    assert T.read_metrics(tmp_path / "seed1")[-1]["val_loss"] != T.read_metrics(reference)[-1]["val_loss"]


# ----------------------------------------------------------------------------- numerical guard

def test_resume_after_nan_guard(tmp_path, monkeypatch, reference):
    """After the NaN guard stops a run, --resume from the kept checkpoint completes, bit-identical
    to a run that never diverged (the guard wrote nothing past the last good checkpoint)."""
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def flaky(*a, **k):
        out = real(*a, **k)
        if k.get("reduction") is None:  # the training loss, not quick_eval's
            calls["n"] += 1
            if calls["n"] == 40:
                return out * float("nan")
        return out

    monkeypatch.setattr(T.F, "cross_entropy", flaky)
    with pytest.raises(T.TrainingDiverged, match="step 39"):
        T.train(tiny_cfg(), tmp_path / "r", progress=False)
    monkeypatch.setattr(T.F, "cross_entropy", real)
    assert T.latest_checkpoint(tmp_path / "r").name == "step-00000032"
    T.train(tiny_cfg(), tmp_path / "r", progress=False, resume=True)
    assert final_bytes(tmp_path / "r") == final_bytes(reference)
    assert T.read_metrics(tmp_path / "r") == T.read_metrics(reference)


# ----------------------------------------------------------------------------- result tables

def test_results_roundtrip_and_skip(tmp_path):
    """A written table reads back equal, is recorded in the manifest (so a re-run skips it), and
    writing leaves no temporary files behind."""
    res = Results(tmp_path, "exp")
    df = pd.DataFrame({"layer": [0, 1], "head": [2, 3], "score": [0.25, -1.5]})
    assert not res.has("scores")
    res.write("scores", df)
    assert res.has("scores")
    pd.testing.assert_frame_equal(Results(tmp_path, "exp").read("scores"), df)
    assert sorted(p.name for p in res.dir.iterdir()) == ["manifest.json", "scores.csv"]
    done = []
    for unit in ("scores", "other"):  # the experiments' resume idiom
        if not res.has(unit):
            done.append(unit)
            res.write(unit, df)
    assert done == ["other"]


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_results_damaged_table_detected(tmp_path, damage):
    """A truncated, edited or missing table raises ResultError naming the file and what to do."""
    res = Results(tmp_path, "exp")
    path = res.write("t", pd.DataFrame({"x": range(100)}))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "edit":
        path.write_text(path.read_text().replace("42", "43"))
    else:
        path.unlink()
    with pytest.raises(ResultError) as e:
        res.read("t")
    assert str(path) in str(e.value)
    assert ("delete" in str(e.value)) if damage != "delete" else ("missing" in str(e.value))


def test_results_corrupted_manifest_detected(tmp_path):
    """A corrupted manifest.json raises ResultError naming the folder to delete, on read and on has()."""
    res = Results(tmp_path, "exp")
    res.write("t", pd.DataFrame({"x": [1]}))
    res.manifest_path.write_text(res.manifest_path.read_text()[:7])
    for call in (lambda: res.read("t"), lambda: res.has("t")):
        with pytest.raises(ResultError, match="delete the folder") as e:
            call()
        assert str(res.dir) in str(e.value)


def test_results_writes_remove_leftover_temporaries_of_dead_writers(tmp_path, dead_and_live_pid):
    """A table write (holding the results folder's lock) removes the temporary files that writes killed
    mid-way left in its folder, of either name form, and keeps one whose writer's pid is alive."""
    from interventions.zoo.ownership import HOST

    dead, live = dead_and_live_pid
    res = Results(tmp_path, "exp")
    res.dir.mkdir(parents=True)
    gone = [res.dir / f".t.csv.tmp{dead}", res.dir / f".manifest.json.tmp{dead}-{HOST}-0badf00d"]
    kept = res.dir / f".u.csv.tmp{live}-{HOST}-0badf00d"
    for p in [*gone, kept]:
        p.write_text("half")
    res.write("t", pd.DataFrame({"x": [1]}))
    assert sorted(p.name for p in res.dir.iterdir()) == sorted(["manifest.json", "t.csv", kept.name])


# ----------------------------------------------------------------------------- safe loading

class _Marker:
    """Unpickling this creates a marker file (what malicious pickle weights would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_load_model_never_unpickles(tmp_path):
    """A model folder holding only pickle weights (pytorch_model.bin) is refused with a message
    naming safetensors, and the pickle is never executed."""
    from interventions import AttnOnlyConfig

    folder = tmp_path / "m"
    folder.mkdir()
    AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=16, vocab_size=20).save_pretrained(folder)
    marker = tmp_path / "UNPICKLED"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Marker(marker)}, f)
    with pytest.raises(T.RunFolderError, match="safetensors"):
        T.load_model(folder)
    assert not marker.exists()
