"""Command line: ``python -m experiments <command> ...`` (``--help`` on each command).

Commands:
  presets      list the training presets
  train        train one model (resumable)
  reproduce    the main job: the default reproduction on the embedded corpus
  phase-change evaluate every checkpoint of runs: ICL, loss by index, head scores, windows, PCA
  ablations    per-head and head-set ablations of a run (needs phase-change results)
  circuit      activation patching and path patching (K-composition) of a run
  figures      make every figure from result tables
  report       figures, report and headline again from a results folder's tables
  survey       the induction mosaic for a list of models

Exit codes: 0 success; 2 bad input (usage, options, corpus, a damaged or stale result, an output
folder in use by another process); 1 a run that failed for a known reason (diverged training, disk
full, read-only folder, out of memory: one line, no traceback); 128 + N interrupted by signal N (130
Ctrl-C, 143 SIGTERM, 129 SIGHUP; worker processes are stopped first), one line saying how to resume; a bug
raises with a traceback.
Usage errors are found before the heavy imports (torch, transformers) and leave no folders.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

from .naming import folder_name

DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")  # as interventions.zoo.train.check_device


def _q(path) -> str:
    """A path as typed into a shell, for the commands the messages suggest (one with a space quoted)."""
    import shlex

    return shlex.quote(str(path))


class UsageError(Exception):
    """Bad input from the command line: exit code 2, nothing written."""


def _parse_set(items: list[str]) -> dict:
    """``--set model.d_model=128 --set lr=3e-4`` -> nested dict (values parsed as JSON when possible;
    ``TrainConfig.from_dict`` then checks every key and parses each value to its declared type)."""
    out: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set {item!r} is not KEY=VALUE (e.g. --set model.d_model=128)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        d = out
        *parents, last = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise UsageError(f"--set {item!r}: {p} is a single value, not a group of options")
        d[last] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_config_from_args(args):
    from interventions.zoo.train import TrainConfig

    from .presets import get_preset

    try:
        cfg = get_preset(args.preset)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    overrides = _parse_set(args.set or [])
    for name in FLAG_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    saved = Path(args.out) / "train_config.json"
    if getattr(args, "resume", False) and "lr" not in overrides and saved.is_file():
        # lr is the one option that may change on --resume, so a resume that does not name one keeps the
        # run's lr (a lowered one after divergence), not the preset's: this one for the checks, the trainer
        # then takes the one it had at the checkpoint resumed on (cmd_train: keep_lr)
        from interventions.zoo.train import read_train_config_dict

        lr = read_train_config_dict(saved.parent).get("lr")
        if lr is not None:
            overrides["lr"] = lr
    cfg = _merge(cfg, overrides)
    from interventions.zoo.corpus import CorpusError
    from interventions.zoo.train import ConfigError

    tc = TrainConfig.from_dict(cfg)  # ConfigError: exit 2
    try:
        tc.validate()
    except CorpusError:
        raise
    except ValueError as e:  # validate() only validates: every ValueError it raises is bad input
        raise ConfigError(str(e)) from None
    return tc


def cmd_presets(args) -> int:
    from .presets import PRESETS

    for name, cfg in PRESETS.items():
        m = cfg["model"]
        print(f"{name:10s} {m.get('n_layers')}L d_model={m.get('d_model')} heads={m.get('n_heads')} "
              f"ctx={m.get('n_ctx')} mlp={m.get('d_mlp')} smear={m.get('smear_keys', False)} "
              f"corpus={cfg['corpus']} tokens={cfg['tokens']:,}")
    return 0


def cmd_train(args) -> int:
    from interventions.zoo.distributed import World
    from interventions.zoo.train import read_metrics, train

    from .zoo import RUN_THREADS, torch_threads

    cfg = train_config_from_args(args)
    out = Path(args.out)
    keep_lr = args.resume and args.lr is None and "lr" not in _parse_set(args.set or [])
    # the zoo's thread count unless --threads: a run's numbers are the same as `reproduce`'s (recorded in
    # provenance.json: machine.threads of each start)
    with torch_threads(args.threads or RUN_THREADS):
        final = train(cfg, out, resume=args.resume, progress=not args.quiet, wait=args.wait, keep_lr=keep_lr)
    if World.from_env().is_main:  # under torchrun: one summary line, from the rank that wrote the run
        last = read_metrics(out)[-1]
        print(json.dumps({"checkpoint": str(final), **last}))
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    if args.device is not None:
        _check_device(args.device)
    if args.corpus is not None:  # before the folder is made (the full check runs in reproduce)
        if args.scale == "tiny":
            raise UsageError("--corpus replaces the byte-level corpus of the cpu and gpu scales; the tiny scale "
                             "trains on synthetic tokens: drop --corpus or use --scale cpu")
        if args.corpus != "stdlib" and not args.corpus.startswith(("hf:", "synthetic:")) and not Path(args.corpus).exists():
            raise UsageError(f"--corpus {args.corpus} does not exist: pass a text file, a folder, a .jsonl file, "
                             "'stdlib' or 'hf:<dataset name>'")
    reproduce(out=Path(args.out), scale=args.scale, device=args.device, progress=not args.quiet,
              seeds=args.seeds, workers=args.workers, figures_dir=Path(args.figures) if args.figures else None,
              corpus=args.corpus)
    return 0


def _owning_results(fn):
    """Run ``fn(args)`` holding the lock of ``--results`` (``figures``, ``report``): a process writing those
    tables (``reproduce``, ``phase-change``, ... into the same folder) is refused as any second writer is
    (exit 2, or ``--wait``), not drawn half-way through its work, and cannot rewrite a table mid-drawing."""
    import functools

    @functools.wraps(fn)
    def inner(args) -> int:
        import contextlib

        from .common import results_lock

        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(results_lock(Path(args.results)))
            except OSError as e:  # a results folder this user cannot write (read-only, someone else's): no writer
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):  # here either; `figures` draws elsewhere
                    raise
            return fn(args)
    return inner


@_owning_results
def cmd_figures(args) -> int:
    from .common import Results, tables_fingerprint, verify_tables
    from .figures import drawn_from, make_figures
    from .phase_change import evaluation_interrupted

    verify_tables(Path(args.results))  # a damaged table: exit 2 before any figure is written
    if evaluation_interrupted(Results(Path(args.results), "phase_change")):  # and tables of two evaluations
        raise UsageError(f"the phase-change tables under {args.results} are partial (the last `phase-change` into it "
                         "was interrupted): rerun that `phase-change` command to completion first")
    report = [n for n in ("REPORT.md", "headline.json") if (Path(args.out) / n).is_file()]
    drawn = drawn_from(Path(args.out))
    if report and drawn is not None and drawn != tables_fingerprint(Path(args.results)):
        raise UsageError(f"{args.out} holds the {' and '.join(report)} of other tables than those under {args.results} "
                         "now: these figures would sit beside a report they do not match; pass another --out, or "
                         f"redraw both with `report --results {_q(args.results)} --figures {_q(args.out)}`")
    paths = make_figures(Path(args.results), Path(args.out))
    if not paths:
        raise UsageError(f"no result tables under {args.results}: run `python -m experiments reproduce --out "
                         f"{_q(args.results)}` first")
    print(f"{len(paths)} files written to {args.out}")
    return 0


@_owning_results
def cmd_report(args) -> int:
    from .reproduce import redraw

    out = Path(args.results)
    if not (out / "phase_change" / "provenance.json").is_file():
        raise UsageError(f"no phase-change results under {out}: run `python -m experiments reproduce --out {_q(out)}` "
                         "first")
    figures = Path(args.figures or out / "figures")
    if figures.exists() and not figures.is_dir():
        raise UsageError(f"{figures} is a file, not a folder: pass --figures DIR")
    git = {"commit": args.commit, "dirty": None} if args.commit else None  # by hand: dirty is not known
    print(redraw(out, args.scale, figures, git=git))
    return 0


def cmd_survey(args) -> int:
    from .figures import fig_mosaic
    from .survey import model_labels, run_survey

    _check_device(args.device)
    run_survey(model_labels(args.models), Path(args.out), device=args.device, allow_pickle=args.allow_pickle,
               remote=args.remote, progress=not args.quiet)
    fig_mosaic(Path(args.out), Path(args.out) / "figures")
    print(f"induction scores in {Path(args.out) / 'survey'}; mosaic in {Path(args.out) / 'figures'}")
    return 0


def _runs(paths: list[str]) -> dict:
    runs = {}
    for p in paths:
        path = Path(p)
        if not (path / "train_config.json").is_file():
            raise UsageError(f"{p} is not a training run folder (no train_config.json): pass folders made by "
                             "`python -m experiments train`")
        runs[folder_name(path)] = path
    return runs


def _check_device(device: str) -> None:
    from interventions.zoo.train import check_device

    check_device(device, option="--device")


def cmd_phase_change(args) -> int:
    from .phase_change import run_phase_change

    _check_device(args.device)
    from .reproduce import headline, phase_change_lines

    out = Path(args.out)
    res = run_phase_change(_runs(args.runs), out, n_windows=args.windows, device=args.device,
                           progress=not args.quiet)
    # the report's sentences (a window, or why none: the fit's size against the minimum), not the 35-column table
    print("\n".join(phase_change_lines(headline(out))))
    print(f"Every column: {res.dir / 'windows.csv'}")
    return 0


def _run_with_phase_change(args):
    """(run name, run folder, its head scores, its phase_change windows) for the single-run commands:
    only results that `phase-change` made from this run in its present state (its content hash)."""
    from .common import Results, run_fingerprint
    from .phase_change import evaluation_interrupted

    _check_device(args.device)
    name, run = next(iter(_runs([args.run]).items()))
    pc = Results(Path(args.out), "phase_change")
    settings = pc.settings()
    key = None if settings is None else {"run": run_fingerprint(run), **settings}
    windows = pc.read("windows") if pc.has("windows") else None
    if key is None or not pc.has(f"head_scores_{name}", key) or windows is None or name not in set(windows.model) \
            or evaluation_interrupted(pc):  # its windows then of the run as it was
        raise UsageError(f"no phase-change results of {run} as it is now under {args.out}/phase_change: run "
                         f"`phase-change {_q(run)} --out {_q(args.out)}` first")
    return name, run, pc.read(f"head_scores_{name}", key), windows


def cmd_ablations(args) -> int:
    from .ablations import run_ablations

    name, run, head_scores, windows = _run_with_phase_change(args)
    res = run_ablations(run, name, head_scores, Path(args.out), windows_table=windows,
                        n_windows=args.windows, device=args.device, progress=not args.quiet)
    print(res.read("sets").to_string(index=False))
    return 0


def cmd_circuit(args) -> int:
    from .circuit import run_circuit

    name, run, head_scores, _ = _run_with_phase_change(args)
    res = run_circuit(run, name, head_scores, Path(args.out), device=args.device)
    print(res.read("path_patch").to_string(index=False))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


FLAG_OPTIONS = ("tokens", "seed", "device", "corpus", "batch_size", "lr")  # train's flags that --set may also give
MAX_SEEDS = 1000  # seeds per model: each is a full training run of every model of the scale


def _seed_count(text: str) -> int:
    """``--seeds``: a positive integer, at most ``MAX_SEEDS`` (a larger count is a typo, not a job)."""
    value = _positive_int(text)
    if value > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{value} seeds per model: at most {MAX_SEEDS} (each is a full training "
                                         "run of every model)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def _command(sp, func, quiet: str | None = "no progress bars") -> None:
    """The options every command that writes results shares (``--quiet`` where it draws progress bars,
    ``--wait``), and the function it runs."""
    if quiet:
        sp.add_argument("--quiet", action="store_true", help=quiet)
    sp.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS",
                    help="if another process is using the folder this command works on (a run or results folder), wait up to this long (default: fail at once)")
    sp.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("presets", help="list the training presets")
    sp.set_defaults(func=cmd_presets)

    sp = sub.add_parser("train", help="train one model")
    sp.add_argument("--preset", default="attn-2l", help="a preset name (see `presets`)")
    sp.add_argument("--out", required=True, help="run folder (created; must be new, or --resume)")
    sp.add_argument("--tokens", type=int, help="total training tokens")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--device", help="cpu (default), cuda, cuda:N or mps")
    sp.add_argument("--corpus", help="stdlib, a path, a .jsonl, hf:<name>, synthetic:repeat|markov")
    sp.add_argument("--batch-size", dest="batch_size", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any option, e.g. --set model.n_layers=3 (repeatable)")
    sp.add_argument("--resume", action="store_true",
                    help="continue from the last complete checkpoint (only --lr may differ from the saved run; "
                         "without it, the lr the run had at that checkpoint)")
    sp.add_argument("--threads", type=_positive_int, default=None,
                    help="torch threads (default: 1, as `reproduce`'s runs: the numbers then do not depend on the "
                         "machine; another count changes them)")
    _command(sp, cmd_train, "no progress bar")

    sp = sub.add_parser("reproduce", help="the default reproduction on the embedded corpus")
    sp.add_argument("--out", default="results/default", help="results folder")
    sp.add_argument("--scale", default="cpu", choices=["tiny", "cpu", "gpu"],
                    help="tiny: about a minute (smoke test); cpu: the default (~14 min on a 2-core AVX-512 CPU, ~27 "
                         "on an AVX2-only one); gpu: the whole family, 3 seeds each, on CUDA")
    sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --scale gpu)")
    sp.add_argument("--seeds", type=_seed_count, default=None,
                    help="seeds per model, 0..N-1 (default: the scale's: 1, or 3 for gpu); with more than one, "
                         "runs are named MODEL-sK and the report adds the spread across seeds")
    sp.add_argument("--workers", type=_positive_int, default=None,
                    help="parallel training/evaluation processes (default: one per core, at most 4; 8 on a GPU); each "
                         "has one torch thread, so the results do not depend on it")
    sp.add_argument("--corpus", default=None,
                    help="replace the presets' corpus (default: stdlib, this interpreter's; for another "
                         "machine to train on identical data: python -m experiments.pack_corpus)")
    sp.add_argument("--figures", default=None, metavar="DIR",
                    help="where figures, REPORT.md and headline.json go (default: figures/ at cpu scale, "
                         "else OUT/figures)")
    _command(sp, cmd_reproduce)

    sp = sub.add_parser("phase-change", help="evaluate every checkpoint of runs (Argument 1, per-token-loss PCA)")
    sp.add_argument("runs", nargs="+", help="run folders")
    sp.add_argument("--out", default="results/custom")
    sp.add_argument("--windows", type=_positive_int, default=512,
                    help="validation windows per checkpoint (default 512; the main job uses 256 at cpu scale: "
                         "pass --windows 256 to rerun its numbers)")
    sp.add_argument("--device", default="cpu")
    _command(sp, cmd_phase_change)

    for name, fn, helptext in (("ablations", cmd_ablations, "per-head and head-set ablations (Argument 3)"),
                               ("circuit", cmd_circuit, "activation patching and path patching (K-composition)")):
        sp = sub.add_parser(name, help=helptext + "; needs `phase-change` results in --out")
        sp.add_argument("run", help="a run folder")
        sp.add_argument("--out", default="results/custom")
        sp.add_argument("--device", default="cpu")
        if name == "ablations":
            sp.add_argument("--windows", type=_positive_int, default=256,
                            help="evaluation windows (default 256; the main job uses 2048 at cpu scale: pass "
                                 "--windows 2048 to rerun its numbers)")
        _command(sp, fn, "no progress bars" if name == "ablations" else None)

    sp = sub.add_parser("figures", help="make every figure from result tables")
    sp.add_argument("--results", default="results/default", help="the results folder (default: results/default)")
    sp.add_argument("--out", default="figures", help="the figures folder (default: figures)")
    _command(sp, cmd_figures, None)

    sp = sub.add_parser("report", help="figures, report and headline again from a reproduction's tables (e.g. "
                                       "tables copied back from a GPU machine)")
    sp.add_argument("--results", default="results/default", help="the results folder (default: results/default)")
    sp.add_argument("--scale", default=None, choices=["tiny", "cpu", "gpu"],
                    help="the scale the tables were made at (default: read off the tables' models and tokens)")
    sp.add_argument("--figures", default=None, metavar="DIR", help="default: RESULTS/figures")
    sp.add_argument("--commit", default=None,
                    help="the commit the tables were made with, where their provenance cannot know it (a copied "
                         "working tree; whether it was dirty is then recorded as unknown); default: the phase "
                         "change's provenance")
    _command(sp, cmd_report, None)

    sp = sub.add_parser("survey", help="induction mosaic over models (hub names, model folders, runs), one model "
                        "at a time, resumable")
    sp.add_argument("models", nargs="+", help="hub names (NAME or NAME@REVISION), model folders or run folders")
    sp.add_argument("--out", default="results/survey")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--allow-pickle", action="store_true",
                    help="allow hub models that only ship pickle weights (.bin); unpickling can run code")
    sp.add_argument("--remote", action="store_true",
                    help="refused for now (exit 2, before any work): the induction score reads attention "
                    "patterns, which need an edited model, and a remote server's model is shared")
    _command(sp, cmd_survey, "no progress bar")
    return p


def _precheck(args) -> None:
    """Usage errors that need no heavy import (torch, transformers): found in milliseconds, nothing written."""
    for option in ("out", "results", "figures"):
        value = getattr(args, option, None)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise UsageError(f"--{option} {value} is a file, not a folder: pass a folder")
        blocked = value is not None and next((p for p in Path(value).parents if p.exists()), None)
        if blocked and not blocked.is_dir():  # no folder can be made under it (train: RunFolderError, also 2)
            raise UsageError(f"--{option} {value} lies under {blocked}, a file, not a folder: pass a writable "
                             f"--{option} folder")
    if args.command != "train" and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise UsageError(f"`{args.command}` does not run under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): only "
                         f"`train` is data-parallel; run `python -m experiments {args.command} ...` as one process")
    device = getattr(args, "device", None)
    if device is not None and not DEVICE_RE.match(device):
        raise UsageError(f"--device={device!r} is not a known device: use cpu, cuda, cuda:N or mps")
    if args.command == "train":
        from .presets import PRESETS

        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
        sets = _parse_set(args.set or [])
        for name in FLAG_OPTIONS:
            value = getattr(args, name, None)
            if value is not None and name in sets and sets[name] != value:  # one would silently win
                raise UsageError(f"{name} is given twice with different values (--set {name}={sets[name]!r} and "
                                 f"--{name.replace('_', '-')} {value!r}): pass it once")
        for name in ("tokens", "batch_size"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: {name}={getattr(args, name)} "
                                 "must be a positive integer")
        if args.corpus is not None and not args.corpus.startswith(("synthetic:", "hf:")) and args.corpus != "stdlib":
            try:
                mode = os.stat(args.corpus).st_mode if args.corpus else None
            except OSError:
                mode = None
            if mode is None:
                raise UsageError(f"--corpus {args.corpus!r} does not exist: pass 'stdlib', a text file, a folder, "
                                 "a .jsonl file, 'hf:<dataset name>' or 'synthetic:repeat'")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UsageError(f"--corpus {args.corpus!r} is not a regular file or folder (a named pipe or "
                                 "device?): pass a text file, a folder or a .jsonl file")
    if args.command == "report" and not (Path(args.results) / "phase_change" / "provenance.json").is_file():
        raise UsageError(f"no phase-change results under {args.results}: run `python -m experiments reproduce --out "
                         f"{_q(args.results)}` first")
    if args.command == "figures" and not list(Path(args.results).glob("*/manifest.json")):  # no table recorded
        raise UsageError(f"no result tables under {args.results}: run `python -m experiments reproduce --out "
                         f"{_q(args.results)}` first")
    if args.command == "ablations" and args.windows < 8:  # experiments.ablations.MIN_WINDOWS (heavy import)
        raise UsageError(f"--windows {args.windows}: the ablations need at least 8 windows (the per-head sweeps use "
                         "a quarter and a half of them, at least 2 each for a standard error)")
    for run in list(getattr(args, "runs", None) or []) + ([args.run] if getattr(args, "run", None) else []):
        if not (Path(run) / "train_config.json").is_file():
            raise UsageError(f"{run} is not a training run folder (no train_config.json): pass folders made by "
                             "`python -m experiments train`")
    names = [folder_name(run) for run in getattr(args, "runs", None) or []]
    if len(set(names)) < len(names):  # tables are keyed by the folder's name: one would replace the other
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"two run folders are named {dup}: pass each run once, or give them different names")


_RESUME_ADVICE = {"train": "rerun the same command with --resume to continue",
                  "reproduce": "rerun the same command: reproduce resumes where it stopped"}
_ENV_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
               errno.EIO: "an input/output error"}


def _known_failure(e: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for bad input and environment failures; None for a bug (traceback)."""
    from interventions.zoo.corpus import CorpusError
    from interventions.zoo.distributed import DistributedError
    from interventions.zoo.ownership import FolderBusyError
    from interventions.zoo.train import ConfigError, RunFolderError, TrainingDiverged

    from .common import InputError, ResultError

    if isinstance(e, (UsageError, CorpusError, RunFolderError, ConfigError, ResultError, FolderBusyError,
                      InputError, DistributedError)):
        return 2, f"error: {e}"
    if isinstance(e, TrainingDiverged):
        return 1, f"training stopped: {e}"
    if isinstance(e, OSError) and e.errno in _ENV_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        return 1, (f"error: {_ENV_ERRNOS[e.errno]}{where}: free space or choose a writable --out, then rerun the "
                   "same command (finished work is kept)")
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return 1, ("error: out of memory: use a smaller batch or model, or a machine with more memory, then rerun "
                   "the same command (finished work is kept)")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _precheck(args)
    except UsageError as e:
        parser.exit(2, f"error: {e}\n")
    from .stopping import stop_on_signal

    try:
        if getattr(args, "wait", None):
            from .common import set_lock_wait

            set_lock_wait(args.wait)
        with stop_on_signal():  # SIGTERM, SIGHUP: as Ctrl-C, with or without worker processes
            return args.func(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (experiments.stopping.Interrupted)
        advice = _RESUME_ADVICE.get(args.command, "rerun the same command: finished tables are kept")
        signum = getattr(e, "signum", signal.SIGINT)
        message = f"interrupted by {signal.Signals(signum).name}: {advice}\n"
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # a torchrun rank: exits without the teardown
            # a rank stopped out of step with the others can leave a failed collective in flight; torch's gloo
            # process group, freed as the interpreter exits, then deadlocks (its destructor joins a thread that
            # waits for the GIL) until torchrun kills it 30 s later. Nothing is left to clean up: its lock and
            # files were released on the way here
            sys.stdout.flush()
            sys.stderr.write(message)
            sys.stderr.flush()
            os._exit(128 + signum)
        parser.exit(128 + signum, message)
    except Exception as e:
        known = _known_failure(e)
        if known is None:
            raise
        parser.exit(known[0], known[1].replace("\n", " ") + "\n")
    finally:
        if getattr(args, "wait", None):
            from .common import set_lock_wait

            set_lock_wait(0.0)  # main() may be called again in this process (tests)


if __name__ == "__main__":
    sys.exit(main())
