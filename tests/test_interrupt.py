"""A stop signal to a command (SIGTERM from a scheduler, ``kill``, ``timeout``; SIGHUP; Ctrl-C), with or
without worker processes: the workers stop with it, its locks are released, it exits 128 + N with one line
saying how to resume, no file is left half-written, and rerunning the same command resumes. A parent
killed outright (SIGKILL) takes its workers with it; Ctrl-C while a worker starts prints no traceback.

Each test failed before its fix: SIGTERM killed the parent outright and its spawned workers went on
training (writing into the run folders and holding their locks) until their model was done, a rerun
meanwhile refused; `train` and `reproduce --workers 1` died on SIGTERM/SIGHUP with no line and no 128 + N;
SIGKILL of the parent left its workers running; Ctrl-C during a worker's start-up printed its traceback.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments.presets import get_preset
from experiments.stopping import Interrupted, stop_on_signal
from interventions.zoo import train as T
from interventions.zoo.ownership import owned

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds worker processes in /proc")

# `reproduce --scale tiny --workers N` with two models of a few seconds each, stopped once trained (what
# follows is not what these tests check). Run with -c: spawned workers do not re-run a -c script.
REPRODUCE = r'''
import sys
import experiments.phase_change
from experiments import zoo
from experiments.__main__ import main

zoo.SCALES["tiny"] = {"attn-1l": 400_000, "attn-2l": 400_000}


def trained(*args, **kwargs):
    print("trained", flush=True)
    raise SystemExit(0)


experiments.phase_change.run_phase_change = trained
sys.exit(main(["reproduce", "--scale", "tiny", "--workers", sys.argv[2], "--quiet", "--out", sys.argv[1]]))
'''

# A pool of two workers, each touching DIR/<i> once its task runs, then sleeping. A script file: spawn runs
# it in each worker at start-up (as __mp_main__), where MODE slow-start stalls it, before the pool's initializer.
POOL = r'''
import sys
import time
from pathlib import Path

if __name__ == "__mp_main__" and sys.argv[2] == "slow-start":
    time.sleep(5)


def task(i):
    Path(sys.argv[1], str(i)).touch()
    time.sleep(60)


if __name__ == "__main__":
    from experiments.stopping import worker_pool

    try:
        with worker_pool(2) as pool:
            pool.map(task, [0, 1])
    except KeyboardInterrupt:
        sys.exit(130)
'''


def workers_of(pid: int) -> list[int]:
    """Pids of the live multiprocessing workers spawned by ``pid`` (its resource tracker left out)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):  # a process that ended while we looked
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                if b"multiprocessing.spawn" in (d / "cmdline").read_bytes() and alive(int(d.name)):
                    found.append(int(d.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def default_stop_signals(ignored: tuple = ()) -> None:
    """In the child before it runs: SIGINT, SIGTERM and SIGHUP at their defaults, whatever this process inherited
    (pytest under ``nohup`` or as a background job ignores SIGHUP / SIGINT, and an ignored signal stays ignored by
    design, so the command would not see the signals these tests send), but those in ``ignored`` ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)


@contextlib.contextmanager
def started(argv: list[str], ignored: tuple = ()):
    """The command in a new process group (``ignored``: signals it starts with ignored), killed with any process
    it left when the test ends."""
    proc = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: default_stop_signals(ignored))
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):  # its group: orphaned workers stay in it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def stopped(proc: subprocess.Popen, sig: int, group: bool = False, grace: float = 1) -> tuple[int, str, list[int]]:
    """Send ``sig`` (to the whole process group, as Ctrl-C does, with ``group``) once the workers run;
    (exit code, last stderr line, workers still running ``grace`` s after the parent exited)."""
    workers = workers_of(proc.pid)
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + grace  # stopped and joined by the parent before it exits: already gone
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in workers if alive(p)]
    if left:  # stopped here, or reading stderr (theirs too) would wait for them to finish
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, (proc.communicate(timeout=30)[1].strip().splitlines() or [""])[-1], left


def assert_nothing_half_written(root: Path) -> None:
    """Every checkpoint verifies, every JSON file parses and every whole metrics line parses (a kill
    mid-write leaves a temp file or folder, or a torn last line that resume drops; never more)."""
    final = [f for f in root.rglob("*") if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    for ckpt in (f for f in final if f.name.startswith("step-")):
        assert T.verify_checkpoint(ckpt), ckpt
    for f in (f for f in final if f.suffix == ".json" or f.name == "metrics.jsonl"):
        lines = f.read_text().splitlines(keepends=True) if f.suffix == ".jsonl" else [f.read_text() + "\n"]
        for line in (line for line in lines if line.endswith("\n")):
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                pytest.fail(f"{f} is half-written: {e}")


@pytest.mark.slow  # 15-30 s on a 2-core CPU: two launches of `reproduce`, each training two models
@pytest.mark.parametrize("workers, sig", [(2, signal.SIGTERM), (1, signal.SIGHUP)], ids=["pool", "no-pool"])
def test_a_stop_signal_stops_the_training_and_the_rerun_resumes(tmp_path, workers, sig):
    """SIGTERM to `reproduce` while its workers train, or SIGHUP to `reproduce --workers 1` training in its own
    process: exit 128 + N with the advice, no worker left, nothing half-written, and the same command again
    resumes the interrupted runs from their checkpoints."""
    out = tmp_path / "out"
    argv = [sys.executable, "-c", REPRODUCE, str(out), str(workers)]
    with started(argv) as proc:
        wait_for(lambda: len(workers_of(proc.pid)) >= (workers if workers > 1 else 0)
                 and any(out.glob("runs/*/checkpoints/step-*")), proc, "checkpoint written by the training")
        code, last, left = stopped(proc, sig)
    assert not left, f"workers {left} outlived the parent"
    assert code == 128 + sig, last
    name = signal.Signals(sig).name
    assert last == f"interrupted by {name}: rerun the same command: reproduce resumes where it stopped"
    assert_rerun_resumes(argv, out)


@pytest.mark.slow  # 15-30 s on a 2-core CPU, as above
def test_sigkill_of_the_parent_stops_its_training_workers_and_the_rerun_resumes(tmp_path):
    """SIGKILL to `reproduce` while its workers train (no handler runs): the workers notice their parent is
    gone and exit within seconds, releasing their run folders; nothing is half-written and the rerun resumes."""
    out = tmp_path / "out"
    argv = [sys.executable, "-c", REPRODUCE, str(out), "2"]
    with started(argv) as proc:
        wait_for(lambda: len(workers_of(proc.pid)) >= 2 and any(out.glob("runs/*/checkpoints/step-*")), proc,
                 "checkpoint written by the workers")
        _, _, left = stopped(proc, signal.SIGKILL, grace=5)
    assert not left, f"workers {left} outlived their killed parent by 5 s"
    assert_rerun_resumes(argv, out)


def assert_rerun_resumes(argv: list[str], out: Path) -> None:
    """Nothing under ``out`` is half-written, some run is unfinished, and ``argv`` again finishes every run,
    some resumed from a checkpoint."""
    assert_nothing_half_written(out)
    runs = [out / "runs" / name for name in ("attn-1l", "attn-2l")]
    final = f"step-{T.TrainConfig.from_dict({**get_preset('tiny'), 'tokens': 400_000}).total_steps:08d}"
    assert not all((r / "checkpoints" / final).is_dir() for r in runs), \
        "both runs finished: before the signal, or their workers went on training after it"

    with started(argv) as proc:
        stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "trained" in stdout, err[-2000:]
    starts = []
    for run in runs:
        assert T.latest_checkpoint(run).name == final, run
        starts += [inv["from_step"] for inv in json.loads((run / "provenance.json").read_text())["invocations"][1:]]
    assert starts and max(starts) > 0, f"no run resumed from a checkpoint: {starts}"


def test_sigterm_stops_train_and_resume_continues(tmp_path):
    """SIGTERM to `train` (one process, no pool) after its first checkpoint: exit 143 with the advice to
    rerun with --resume, every checkpoint verifies, and that rerun continues from the last one."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "experiments", "train", "--preset", "tiny", "--tokens", "400000", "--quiet",
            "--out", str(out)]
    with started(argv) as proc:
        wait_for(lambda: any(out.glob("checkpoints/step-*")), proc, "first checkpoint")
        code, last, _ = stopped(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, last
    assert last == "interrupted by SIGTERM: rerun the same command with --resume to continue"
    assert_nothing_half_written(out)
    final = f"step-{T.TrainConfig.from_dict({**get_preset('tiny'), 'tokens': 400_000}).total_steps:08d}"
    assert T.latest_checkpoint(out).name != final, "finished before the signal"
    res = subprocess.run(argv + ["--resume"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert T.latest_checkpoint(out).name == final
    assert json.loads((out / "provenance.json").read_text())["invocations"][-1]["from_step"] > 0


def test_sigkill_of_the_parent_ends_its_workers(tmp_path):
    """SIGKILL to a parent whose pool workers are busy: no handler runs in it, yet the workers notice it is
    gone and exit within seconds (before: they ran their task to its end, holding their locks)."""
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    with started([sys.executable, str(script), str(tmp_path), "run"]) as proc:
        wait_for(lambda: (tmp_path / "0").exists() and (tmp_path / "1").exists(), proc, "tasks running")
        _, _, left = stopped(proc, signal.SIGKILL, grace=5)
    assert not left, f"workers {left} outlived their killed parent by 5 s"


def test_ctrl_c_while_the_workers_start_prints_no_traceback(tmp_path):
    """Ctrl-C (SIGINT to the process group) while the workers are still starting (here: stalled in the
    script spawn runs before the pool's initializer): the parent stops them, and no worker prints a
    KeyboardInterrupt traceback."""
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    with started([sys.executable, str(script), str(tmp_path), "slow-start"]) as proc:
        wait_for(lambda: len(workers_of(proc.pid)) >= 2, proc, "workers")
        time.sleep(1)  # in their start-up's 5 s stall
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "0").exists()  # the stall was still on: no task ran


@pytest.mark.parametrize("mode", ["run", "slow-start"])
def test_ctrl_c_stops_the_workers_of_a_command_started_with_sigterm_ignored(tmp_path, mode):
    """A command started with SIGTERM ignored (`trap '' TERM`, or a parent's SIG_IGN: its spawned workers inherit
    it), Ctrl-C while its workers run their tasks or while they start: the workers stop, the parent exits 130
    within seconds (before: the workers ignored the SIGTERM of the parent's terminate, and it waited for them
    forever, well past their 60 s task)."""
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    with started([sys.executable, str(script), str(tmp_path), mode], ignored=(signal.SIGTERM,)) as proc:
        if mode == "run":
            wait_for(lambda: (tmp_path / "0").exists() and (tmp_path / "1").exists(), proc, "tasks running")
        else:
            wait_for(lambda: len(workers_of(proc.pid)) >= 2, proc, "workers")
            time.sleep(1)  # in their start-up's 5 s stall
        workers = workers_of(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the parent still waits for its workers 30 s after Ctrl-C")
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert workers and not [p for p in workers if alive(p)]
    if mode == "slow-start":
        assert not (tmp_path / "0").exists()  # the stall was still on: no task ran


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="phase-change evaluates in this process on one core")
@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_stops_the_evaluation_workers(tmp_path, sig, group):
    """SIGTERM to `phase-change`, or Ctrl-C to its process group, while its workers evaluate checkpoints:
    exit 128 + N with the advice, no worker left, and the results folder free for the rerun."""
    cfg = T.TrainConfig.from_dict({**get_preset("tiny"), "tokens": 4_000})
    T.train(cfg, tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns(".lock"))
    res = tmp_path / "res"
    argv = [sys.executable, "-m", "experiments", "phase-change", str(tmp_path / "a"), str(tmp_path / "b"),
            "--out", str(res), "--windows", "16", "--quiet"]
    with started(argv) as proc:
        wait_for(lambda: len(workers_of(proc.pid)) >= 2, proc, "evaluation workers")  # just spawned: busy for seconds
        code, last, left = stopped(proc, sig, group)
    assert not left, f"workers {left} outlived the parent"
    name = signal.Signals(sig).name
    assert code == 128 + sig and last == f"interrupted by {name}: rerun the same command: finished tables are kept"
    assert_nothing_half_written(res)
    with owned(res):  # released: a rerun is not refused
        pass


def test_stop_on_signal_raises_once_defers_and_restores():
    """Inside the block SIGTERM raises ``Interrupted`` (once: a second signal during the cleanup is dropped);
    in ``deferred`` it is raised at the end of it; an ignored signal stays ignored; the previous handlers
    are back after; off the main thread nothing is installed."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    before_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(Interrupted) as e, stop_on_signal():
            assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]  # else the kill below ends pytest
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # dropped: the first is unwinding
                time.sleep(0.1)
        assert e.value.signum == signal.SIGTERM and isinstance(e.value, KeyboardInterrupt)
        done = []
        with pytest.raises(Interrupted), stop_on_signal() as deferred, deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            done.append(True)
        assert done
        assert {s: signal.getsignal(s) for s in before} == before
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before_hup)
    seen = []

    def off_main():
        with stop_on_signal():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=off_main)
    t.start()
    t.join()
    assert seen == [before[signal.SIGTERM]]


# A stop signal whose Interrupted Python swallows (raised in a __del__: "Exception ignored in"), then another.
SWALLOWED = r'''
import os
import signal
import sys
import time

from experiments.stopping import stop_on_signal


class Swallows:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the Interrupted is raised here, and ignored


try:
    with stop_on_signal():
        Swallows()
        print("went on", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(20)
        print("not stopped", flush=True)
except KeyboardInterrupt as e:
    print("stopped by", e.signum, flush=True)
    sys.exit(128 + e.signum)
'''


def test_a_stop_signal_after_one_python_swallowed_stops_the_command():
    """A first signal whose ``Interrupted`` Python swallows (raised inside a ``__del__``: "Exception ignored")
    leaves the command running; the next signal stops it (before: every later signal was dropped, so only
    SIGKILL could stop the command)."""
    proc = subprocess.run([sys.executable, "-c", SWALLOWED], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=60, preexec_fn=default_stop_signals)
    assert "Exception ignored" in proc.stderr and "Interrupted: SIGTERM" in proc.stderr, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["went on", f"stopped by {int(signal.SIGTERM)}"], proc.stdout
    assert proc.returncode == 128 + signal.SIGTERM


def test_a_stop_on_signal_block_inside_another_is_that_block():
    """Nested (a pool's block inside the CLI's): the inner block installs nothing and yields the outer's
    ``deferred``, so a command raises once: a second signal, during the unwinding, is dropped."""
    with stop_on_signal() as outer:
        installed = signal.getsignal(signal.SIGTERM)
        with stop_on_signal() as inner:
            assert inner is outer and signal.getsignal(signal.SIGTERM) is installed
        assert signal.getsignal(signal.SIGTERM) is installed
    with pytest.raises(Interrupted) as e, stop_on_signal():
        try:
            with stop_on_signal():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # dropped: the first is unwinding
            time.sleep(0.1)
    assert e.value.__context__ is None  # not a second Interrupted raised while the first unwound


def test_a_deferred_block_inside_another_raises_at_the_outer_end():
    """``deferred`` nested in another: a signal received in the inner block is raised at the end of the
    outer one, never in the middle of the outer body (before: at the inner block's end)."""
    done = []
    with pytest.raises(Interrupted), stop_on_signal() as deferred:
        with deferred():
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
            done.append("the rest of the outer block")
    assert done == ["the rest of the outer block"]


def test_a_stop_signal_while_the_pool_starts_stops_its_workers(monkeypatch):
    """A signal received while ``worker_pool`` starts its workers (deferred to the end of the start) is
    raised with the workers terminated and joined (before: raised before the block that stops them, so
    they ran on, idle, for as long as the exception's traceback was kept)."""
    import multiprocessing

    from experiments import stopping

    real = stopping.start_signals_blocked

    @contextlib.contextmanager
    def signalled():
        with real():
            yield
            os.kill(os.getpid(), signal.SIGTERM)  # while the pool is being made

    before = {p.pid for p in multiprocessing.active_children()}
    monkeypatch.setattr(stopping, "start_signals_blocked", signalled)
    with pytest.raises(Interrupted) as e:
        with stopping.worker_pool(1):
            pytest.fail("the block ran")
    left = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert not left, f"workers {left} outlived the pool's block ({e.value!r})"


def signal_after_writing(monkeypatch, module, name: str) -> None:
    """SIGTERM to this process right after ``module``'s atomic writes put a file named ``name`` in place
    (before anything else is written: its record in the manifest)."""
    for fn in ("atomic_write_bytes", "atomic_write_text"):
        real = getattr(module, fn)

        def write(path, data, real=real):
            real(path, data)
            if Path(path).name == name:
                os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(module, fn, write)


@pytest.mark.parametrize("name", ["timings.json", "provenance.json"])
def test_a_stop_signal_while_a_result_is_written_stops_after_its_record(tmp_path, monkeypatch, name):
    """SIGTERM just after a result file (a JSON file, provenance.json) replaced the previous one, before the
    manifest recorded its checksum: the signal waits for the record, so the file reads back (before: a
    checksum error naming it, and provenance's earlier invocations dropped by the next start)."""
    from experiments import common

    res = common.Results(tmp_path, "report")
    res.write_json("timings", [1])
    res.write_provenance({"n": 1})
    signal_after_writing(monkeypatch, common, name)
    with pytest.raises(Interrupted), stop_on_signal():
        res.write_json("timings", [1, 2]) if name == "timings.json" else res.write_provenance({"n": 1})
    monkeypatch.undo()
    assert res.read_json("timings") == ([1, 2] if name == "timings.json" else [1])
    assert len(res.read_provenance()["invocations"]) == (2 if name == "provenance.json" else 1)


def test_reproduce_stopped_while_it_records_its_timings_resumes(tmp_path, monkeypatch, capsys):
    """`reproduce` stopped by SIGTERM just after it rewrote report/timings.json, before its manifest recorded
    it: exit 143 with "rerun the same command", and that rerun gets past it to the training (before: it
    refused with exit 2, timings.json "does not match its recorded checksum")."""
    from experiments import common, zoo
    from experiments.__main__ import main

    def stopped_in_training(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM did not stop the training")

    monkeypatch.setattr(zoo, "train_zoo", stopped_in_training)
    argv = ["reproduce", "--scale", "tiny", "--quiet", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv)  # a first invocation, stopped in training: timings.json records it
    assert e.value.code == 128 + signal.SIGTERM
    with monkeypatch.context() as m:
        signal_after_writing(m, common, "timings.json")
        with pytest.raises(SystemExit) as e:
            main(argv)  # the second, stopped as it records its start
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "interrupted by SIGTERM: rerun the same command: reproduce resumes where it stopped"
    with pytest.raises(SystemExit) as e:
        main(argv)  # the rerun: stopped in training again, so it got there
    assert e.value.code == 128 + signal.SIGTERM, capsys.readouterr().err[-2000:]
