"""Data-parallel training: ``torchrun --nproc_per_node 2`` (DDP, gloo on the CPU) against one process.

The runs are real ``torchrun`` launches of the CLI on the ``tiny`` preset for 300 steps (global batch 16
x 64 tokens), with a checkpoint and a metrics line every 10 steps, so the loss curve has 38 points.
"""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from experiments.__main__ import main
from interventions.zoo import train as T
from interventions.zoo.distributed import DistributedError, World
from interventions.zoo.model import AttnOnlyConfig, AttnOnlyForCausalLM

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300
TRAIN = ["train", "--preset", "tiny", "--tokens", str(STEPS * 16 * 64), "--quiet",
         "--set", "checkpoint_every_tokens=10240"]  # a checkpoint every 10 steps: a 38-point curve
# Float tolerance of DDP against one process, on every number in metrics.jsonl. Two processes sum
# each gradient in two halves, one process in one pass: the sums differ in the last bit (~1e-7
# relative), and Adam at the preset's lr 1e-2 amplifies such a difference along the trajectory, by
# ~10x every 30-50 steps late in this run. Measured here (2-core CPU): at most 2.2e-6 up to step 100
# (5e-7 on the losses), then growing to 1.8e-4 on a loss and 5.3e-4 on the ICL score (a difference of
# two loss means) at step 300. Hence two tolerances: TOL_EARLY up to step 100, where any real
# data-parallel bug already shows (one rank's rows only, the same rows on both ranks, or summed
# instead of averaged gradients move the per-step loss by 1e-4 to 3e-2 within the first 10 steps,
# measured with the half-batch computation below), and TOL after it, ~4x the worst measured drift. The strict
# check is the bitwise one against an independent half-batch computation
# (test_ddp_is_the_average_of_half_batch_gradients).
EARLY_STEPS, TOL_EARLY, TOL = 100, 1e-5, 2e-3


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1")  # one thread per process, as torchrun's default; no warning


def _torchrun(out: Path, *extra: str, train: list[str] = TRAIN) -> list[str]:
    # --standalone: a local rendezvous on a free port (parallel test runs never collide)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "experiments", *train, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """(run folder, stdout) of an uninterrupted 2-process run."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    res = subprocess.run(_torchrun(out), capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, one_thread):
    """The same command without torchrun (in this process: the CLI's own ``main``)."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert "WORLD_SIZE" not in os.environ
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def _curve(run: Path) -> list[dict]:
    return T.read_metrics(run)


@pytest.mark.slow  # torchrun launches: ~50 s for the module on a 2-core CPU
def test_ddp_loss_curve_matches_one_process(ddp_run, one_process_run):
    """Same global batch and seed: every metrics line (train loss over the last 10 steps, validation
    loss, ICL score, repeated-token losses) of the 2-process run equals one process's, within
    TOL_EARLY up to step 100 and TOL after (see TOL)."""
    ddp, one = _curve(ddp_run[0]), _curve(one_process_run)
    assert [m["step"] for m in ddp] == [m["step"] for m in one] and len(ddp) >= 30
    worst = {True: 0.0, False: 0.0}  # early, late
    for a, b in zip(ddp, one):
        early = a["step"] <= EARLY_STEPS
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        for key in ("train_loss", "val_loss", "icl_score", "repeat_loss_first", "repeat_loss_second"):
            if a[key] is None:  # step 0 has no train loss
                assert b[key] is None
                continue
            worst[early] = max(worst[early], abs(a[key] - b[key]))
            assert a[key] == pytest.approx(b[key], abs=TOL_EARLY if early else TOL), (a["step"], key)
    print(f"max |DDP - one process| over {len(ddp)} metrics lines: {worst[True]:.1e} up to step {EARLY_STEPS}, "
          f"{worst[False]:.1e} after")
    assert one[-1]["val_loss"] < one[0]["val_loss"] - 0.1  # the curve moved: it is a training run


@pytest.mark.slow
def test_ddp_is_the_average_of_half_batch_gradients(ddp_run, one_thread):
    """Bit for bit, the 2-process weights after 300 steps are those of an independent computation in
    plain torch: each step, the gradient of the mean loss on rows 0-7 and on rows 8-15 of the
    one-process batch, averaged, clipped, AdamW. So each rank took its half of the one-process data
    order and DDP averaged (not summed, not dropped) the ranks' gradients."""
    run = ddp_run[0]
    cfg = T.load_train_config(run)
    source, _, _ = T.build_source(cfg)
    torch.manual_seed(cfg.seed)
    model = AttnOnlyForCausalLM(AttnOnlyConfig(**cfg.model)).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)
    half = cfg.batch_size // 2
    for step in range(cfg.total_steps):
        for group in opt.param_groups:
            group["lr"] = T.lr_at(step, cfg)
        x = source.train_batch(step, cfg.batch_size, cfg.n_ctx, cfg.seed)  # (batch, pos)
        grads = []
        for rows in (x[:half], x[half:]):
            logits = model(rows).logits  # (batch/2, pos, vocab)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
            grads.append(torch.autograd.grad(loss, params))
        for p, g0, g1 in zip(params, *grads):
            p.grad = (g0 + g1) / 2
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    saved = load_file(str(T.latest_checkpoint(run) / "model.safetensors"))
    assert T.latest_checkpoint(run).name == f"step-{STEPS:08d}"
    mine = model.state_dict()
    differ = [k for k in saved if not torch.equal(saved[k], mine[k])]
    assert not differ, (f"{len(differ)} tensors differ, e.g. {differ[0]}: "
                        f"max {(saved[differ[0]] - mine[differ[0]]).abs().max()}")


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.slow
def test_rank0_alone_wrote_a_complete_run(ddp_run, one_process_run):
    """The DDP run folder holds exactly the files of the one-process run (no temporary leftovers, no
    second writer's files), one metrics line per checkpoint (a second writer would duplicate them),
    every checkpoint verified by its manifest, provenance recording 2 processes; one summary line."""
    run, stdout = ddp_run
    assert _files(run) == _files(one_process_run)
    steps = [m["step"] for m in T.read_metrics(run)]
    assert steps == [0, *T.checkpoint_schedule(T.load_train_config(run))]
    assert [int(p.name.split("-")[1]) for p in T.list_checkpoints(run)] == steps[1:]
    assert all(T.verify_checkpoint(p) for p in (run / "checkpoints").iterdir())
    assert _starts(run) == [(0, 2)] and _starts(one_process_run) == [(0, 1)]
    summaries = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["step"] == STEPS


@pytest.mark.slow
def test_ddp_resume_after_kill_matches_uninterrupted(ddp_run, tmp_path):
    """SIGTERM to torchrun after the step-20 checkpoint (workers die mid-run, as on preemption), then
    the same command with --resume under torchrun: the metrics and the final weights are identical
    to the uninterrupted 2-process run."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env())
    try:
        while not (out / "checkpoints" / "step-00000020").exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert T.latest_checkpoint(out) is not None, err[-3000:]
    assert not (out / "checkpoints" / f"step-{STEPS:08d}").exists(), "the run ended before it was interrupted"
    res = subprocess.run(_torchrun(out, "--resume"), capture_output=True, text=True, cwd=ROOT, env=_env(),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert T.read_metrics(out) == T.read_metrics(ddp_run[0])
    last = f"checkpoints/step-{STEPS:08d}/model.safetensors"
    assert (out / last).read_bytes() == (ddp_run[0] / last).read_bytes()
    assert _files(out) == _files(ddp_run[0])


SHORT = ["train", "--preset", "tiny", "--tokens", str(6 * 16 * 64), "--quiet",
         "--set", "checkpoint_every_tokens=1024"]  # 6 steps, a checkpoint after each


def _starts(run: Path) -> list[tuple[int, int]]:
    """(step continued from, processes) of each start of a run, from its provenance.json."""
    prov = json.loads((run / "provenance.json").read_text())
    assert "processes" not in prov  # one count at the top would misdescribe a run resumed under another
    return [(i["from_step"], i["processes"]) for i in prov["invocations"]]


def _start_one_process(out: Path, steps: int) -> None:
    """The first ``steps`` steps of the SHORT run in this process, then stop (as if killed)."""
    from experiments.__main__ import build_parser, train_config_from_args

    cfg = train_config_from_args(build_parser().parse_args([*SHORT, "--out", str(out)]))
    T.train(cfg, out, progress=False, stop_after_steps=steps)
    assert T.latest_checkpoint(out).name == f"step-{steps:08d}"


@pytest.mark.slow  # one short torchrun launch: ~10 s on a 2-core CPU
def test_resume_under_another_process_count_records_each_start(tmp_path, one_thread):
    """A run started by one process and resumed under torchrun with 2 processes: provenance.json records
    each start (the step it continued from, its number of processes, its commit and machine), not the
    first start's count alone."""
    out = tmp_path / "run"
    _start_one_process(out, 2)
    res = subprocess.run(_torchrun(out, "--resume", train=SHORT), capture_output=True, text=True, cwd=ROOT,
                         env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert T.latest_checkpoint(out).name == "step-00000006"
    assert _starts(out) == [(0, 1), (2, 2)]
    starts = json.loads((out / "provenance.json").read_text())["invocations"]
    assert all(s["git"] and s["machine"] and s["versions"] and s["created"] for s in starts)


def test_resume_of_a_run_recorded_before_starts_were_keeps_its_first_start(tmp_path, one_thread):
    """A run whose provenance.json predates ``invocations`` (one top-level ``processes``, as written by
    a 2-process start) and is resumed by one process: its first start comes first, from the top level."""
    out = tmp_path / "run"
    _start_one_process(out, 2)
    path = out / "provenance.json"
    old = json.loads(path.read_text())
    first = old.pop("invocations")[0]
    old.update({k: v for k, v in first.items() if k != "from_step"}, processes=2)
    path.write_text(json.dumps(old))
    from experiments.__main__ import main

    assert main([*SHORT, "--out", str(out), "--resume"]) == 0
    prov = json.loads(path.read_text())
    assert [(i["from_step"], i["processes"]) for i in prov["invocations"]] == [(0, 2), (2, 1)]
    assert prov["invocations"][0]["created"] == old["created"] and prov["corpus"] == old["corpus"]


def test_batch_not_divisible_by_processes_is_refused(tmp_path, monkeypatch, capsys):
    """A global batch that the processes cannot share equally exits 2 naming the fix, before any work
    (the check runs before the process group is joined, so torchrun's environment of one of 3
    processes is enough to reach it), and writes nothing."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main([*TRAIN, "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert ("batch_size 16 is not divisible by 3 processes" in err
            and "use --nproc_per_node 2, 4, 8 or 16, or --set batch_size=15 or 18" in err), err
    assert not (tmp_path / "run").exists()


def test_other_commands_refuse_torchrun(tmp_path, monkeypatch, capsys):
    """Only `train` is data-parallel: another command started by torchrun exits 2 naming the fix."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_:
        main(["figures", "--results", str(tmp_path), "--out", str(tmp_path / "figs")])
    assert exit_.value.code == 2 and "only `train` is data-parallel" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()


def test_world_from_env_and_bad_setups(monkeypatch):
    """torchrun's variables are read and checked; rows partition the global batch; a device that
    cannot be split per process is refused naming the fix."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World(0, 1, 0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="inconsistent torchrun environment"):
        World.from_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert World.from_env() == World(1, 2, 1, 2)
    rows = [World(r, 4).rows(16) for r in range(4)]
    assert [i for s in rows for i in range(16)[s]] == list(range(16))
    with pytest.raises(DistributedError, match="pass --device cuda"):
        World(1, 2, 1).device("cuda:1")
    with pytest.raises(DistributedError, match="use --device cpu"):
        World(1, 2, 1).device("mps")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedError, match="has 1 CUDA device.* use --nproc_per_node 1 or fewer"):
        World(0, 2, 0, 2).device("cuda")  # rank 0 too: no rank waits for one that stopped
    assert World(0, 2, 0, 1).device("cuda") == "cuda:0"  # 2 machines of 1 GPU
    assert World(0, 1).device("cuda:1") == "cuda:1" and World(1, 2).device("cpu") == "cpu"
    with pytest.raises(DistributedError, match="--nproc_per_node 1, or --set batch_size=2 "):
        World(0, 2).check_batch(1)
    World(2, 3).check_batch(3)


def test_readme_shows_the_tested_commands():
    """The README's torchrun commands are the ones these tests run (docs match what is tested)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Data-parallel training (torchrun)")[1].split("\n## ")[0]
    tested = " ".join(_torchrun(Path("runs/tiny-ddp"))[1:])
    assert f".venv/bin/python {tested}\n" in section
    assert f".venv/bin/python {tested} --resume\n" in section


def test_collective_timeout_covers_the_lock_wait(tmp_path, monkeypatch):
    """With --wait, rank 0 may wait that long for the run folder's lock while the other ranks wait in
    a collective for it: the process group's timeout (gloo's default 30 min) must outlast the wait,
    else they die with a gloo timeout traceback. (init_process_group is stubbed: its arguments are
    what is checked.)"""
    from torch.distributed.constants import default_pg_timeout

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    seen = {}

    class Stop(Exception):
        pass

    def init_process_group(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        main([*TRAIN, "--wait", "7200", "--out", str(tmp_path / "run")])
    assert seen["backend"] == "gloo"
    assert seen.get("timeout") is not None and seen["timeout"] >= default_pg_timeout + datetime.timedelta(seconds=7200)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a torchrun launch stopped after its first checkpoints: ~10 s on a 2-core CPU
def test_sigterm_to_torchrun_stops_every_rank_within_seconds(tmp_path):
    """SIGTERM to torchrun (a preemption): it passes it to the ranks, each exits 143 with the advice, within
    seconds. Before, in most tries one rank, stopped out of step with the other (one in its forward pass, the
    other in a collective), hung as its interpreter exited: torch's gloo process group, freed then with the
    GIL held, joins its worker thread, which waits for the GIL to free the failed collective's tensors;
    torchrun killed it 30 s later. Racy by nature: three launches."""
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(_torchrun(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=_env(), start_new_session=True)
        try:
            while not (out / "checkpoints" / "step-00000020").exists() and proc.poll() is None:
                time.sleep(0.01)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
            took = time.monotonic() - start
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        advice = "interrupted by SIGTERM: rerun the same command with --resume to continue"
        assert err.count(advice) == 2, err[-3000:]
        assert took < 15, f"attempt {attempt}: the ranks took {took:.0f} s to stop: {err[-3000:]}"
