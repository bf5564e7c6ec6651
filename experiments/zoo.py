"""The small-model zoo at each scale, and training it (resumable: finished runs are skipped).

Scales (every model of a scale shares one schedule: constant lr after the same warm-up, so any
prefix of a longer run is comparable with a shorter run at equal tokens):
  * ``tiny``: synthetic repeated-token data, 2-layer width-32 models; seconds. For tests.
  * ``cpu``: the default reproduction on the embedded corpus (Python stdlib, bytes) on a 2-core CPU:
    attn-2l until its ICL score has plateaued, the attn-1l control at least as long, and the smeared
    models long enough to compare with the vanilla ones at equal tokens (see ``SCALES``).
  * ``gpu``: the whole family (adds attn-3l, mlp-1l, mlp-2l) with the cpu scale's token counts (the
    smeared models 6M: theirs form by ~2M), 3 seeds each, on CUDA: the seed spread of every headline number.

``seeds`` (``reproduce --seeds N``) overrides a scale's seeds with 0..N-1; with more than one seed
each run folder is named ``<model>-s<seed>``.

Models train in parallel worker processes (one per core by default, each with one torch thread: on
the 2-core CPU two single-threaded runs give ~1.2-1.3x the tokens/s of one run on both cores, and a
fixed thread count keeps results bit-identical on any machine; on a GPU up to 8 processes share the
card: small models are launch-bound, so parallel runs fill it). The workers never outlive the parent:
Ctrl-C, SIGTERM or SIGHUP stops them first, and a worker whose parent was killed outright ends itself
(``stopping.worker_pool``); the same command resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from interventions.engine.tracing import check_positive
from interventions.zoo.train import TrainConfig, list_checkpoints, read_metrics, train

from .presets import get_preset

# tokens per model at each scale. cpu: attn-2l's ICL window ends by ~12-15M tokens (the
# calibration, docs/calibration.md), so 20M leaves the last 20%+ of the run to show the plateau.
SCALES: dict[str, dict[str, int]] = {
    "tiny": {"attn-1l": 1_500_000, "attn-2l": 1_500_000, "smear-1l": 600_000, "smear-2l": 600_000},
    "cpu": {"attn-1l": 20_000_000, "attn-2l": 20_000_000, "smear-1l": 6_000_000, "smear-2l": 6_000_000},
    "gpu": {"attn-1l": 20_000_000, "attn-2l": 20_000_000, "attn-3l": 20_000_000, "mlp-1l": 20_000_000,
            "mlp-2l": 20_000_000, "smear-1l": 6_000_000, "smear-2l": 6_000_000},
}
SEEDS = {"tiny": (0,), "cpu": (0,), "gpu": (0, 1, 2)}
# torch threads of each training run and checkpoint evaluation, with any number of workers: a fixed count
# keeps results bit-identical on any machine, and a run resumed with another --workers equal to one not
# interrupted (2 threads instead of 1 change every number after the first step)
RUN_THREADS = 1
# models whose transition we do not need to resolve finely: no dense checkpoints (cheaper evaluation)
SPARSE = ("attn-1l", "mlp-1l", "smear-1l", "smear-2l")


def scale_seeds(scale: str, seeds: int | None = None) -> tuple[int, ...]:
    """The seeds a scale trains: its own (``SEEDS``), or 0..seeds-1."""
    if seeds is None:
        return SEEDS[scale]
    return tuple(range(check_positive(seeds, "seeds", why="the number of seeds per model")))


def run_name(model: str, seed: int, seeds: tuple[int, ...]) -> str:
    """Folder name of one run: the model name, plus ``-s<seed>`` where several seeds are trained."""
    return model if len(seeds) == 1 else f"{model}-s{seed}"


def split_run_name(name: str) -> tuple[str, int | None]:
    """(model, seed) of a run folder name, the inverse of ``run_name``: ``attn-2l-s1`` -> ("attn-2l", 1),
    ``attn-2l`` -> ("attn-2l", None).

        >>> split_run_name("smear-1l-s2"), split_run_name("smear-1l")
        (('smear-1l', 2), ('smear-1l', None))
    """
    m = re.fullmatch(r"(.+)-s(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def smear_twins(names) -> list[tuple[str, str]]:
    """(vanilla, smeared) run pairs among ``names``: ``attn-Nl`` with ``smear-Nl`` of the same seed.

    >>> smear_twins(["attn-1l", "attn-2l-s1", "smear-2l-s1", "smear-1l", "smear-2l"])
    [('attn-1l', 'smear-1l'), ('attn-2l-s1', 'smear-2l-s1')]
    """
    names = list(dict.fromkeys(names))
    pairs = [(a, "smear-" + a[len("attn-"):]) for a in names if split_run_name(a)[0] in ("attn-1l", "attn-2l")]
    return [(a, b) for a, b in pairs if b in names]


def zoo_configs(scale: str, device: str = "cpu", seeds: int | None = None,
                corpus: str | None = None) -> dict[str, TrainConfig]:
    """Every run's ``TrainConfig`` at ``scale`` (``corpus`` replaces the presets' corpus)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
    if corpus is not None and scale == "tiny":
        from interventions.zoo.train import ConfigError

        raise ConfigError("--corpus replaces the byte-level corpus of the cpu and gpu scales; the tiny scale trains "
                          "on synthetic tokens of its own vocabulary: drop --corpus or use --scale cpu")
    out = {}
    all_seeds = scale_seeds(scale, seeds)
    for seed in all_seeds:
        for name, tokens in SCALES[scale].items():
            if scale == "tiny":
                cfg = get_preset("tiny")
                layers = int(name.split("-")[1][0])
                cfg["model"] = dict(cfg["model"], n_layers=layers, smear_keys=name.startswith("smear"))
                cfg["n_checkpoints"] = 10
                # attn-2l every 75k tokens: ~14 checkpoints in its window fit (from 0.5M), so the fit's
                # significance test (phase_change.WINDOW_P) does not sit near its level (9 gave p = 0.046)
                cfg["checkpoint_every_tokens"] = 150_000 if name in SPARSE else 75_000
                cfg["dense_checkpoints"] = None
            else:
                cfg = get_preset(name)
                if name in SPARSE:
                    cfg["dense_checkpoints"] = None
                    cfg["checkpoint_every_tokens"] = 500_000 if name.startswith("smear") else 1_000_000
            cfg.update(tokens=tokens, device=device, seed=seed)
            if corpus is not None:
                cfg["corpus"] = corpus
            out[run_name(name, seed, all_seeds)] = TrainConfig.from_dict(cfg)
    return out


def _cost(cfg: TrainConfig) -> float:
    """Relative training cost: tokens x layers (for load balancing the workers)."""
    return cfg.tokens * int(cfg.model.get("n_layers", 2))


def _train_one(job) -> tuple[str, str]:
    name, cfg_dict, run, threads, progress, position = job
    cfg = TrainConfig.from_dict(cfg_dict)
    run = Path(run)
    resume = (run / "train_config.json").is_file()
    with torch_threads(threads):  # keep_lr: the run's lr at its checkpoint (lowered by `train --resume --lr`)
        train(cfg, run, resume=resume, progress=progress, progress_position=position, keep_lr=True)
    return name, str(run)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads, then restore the count (a job run in this process, not in
    a worker, leaves the caller's thread count as it found it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers(device: str) -> int:
    """One worker per CPU core, at most 4 (on a GPU at most 8 processes share the card)."""
    return max(1, min(8 if device.startswith("cuda") else 4, os.cpu_count() or 1))


def train_zoo(scale: str, runs_dir: str | Path, device: str = "cpu", progress: bool = True,
              only: list[str] | None = None, workers: int | None = None, seeds: int | None = None,
              corpus: str | None = None) -> dict[str, Path]:
    """Train (or resume, or skip when finished) every model of a scale. Returns run folders.

    ``workers`` > 1 trains models in parallel processes (spawned), one torch thread each."""
    runs_dir = Path(runs_dir)
    cfgs = {n: c for n, c in zoo_configs(scale, device, seeds, corpus).items() if only is None or n in only}
    out = {name: runs_dir / name for name in cfgs}
    for name in cfgs:  # before any work: a run made with other options is never taken for the asked-for one
        _check_same_run(out[name], cfgs[name])
    todo = sorted((n for n in cfgs if not _finished(out[n], cfgs[n])), key=lambda n: -_cost(cfgs[n]))
    workers = min(len(todo), workers or default_workers(device))
    if not todo:
        return out
    threads = RUN_THREADS  # whatever the worker count: --workers 1 must not change the results
    from interventions.zoo.train import build_source

    for cfg in {c.corpus: c for c in (cfgs[n] for n in todo)}.values():  # tokenise once, with a progress bar,
        build_source(cfg, progress=progress)  # before the workers share the cache
    jobs = [(n, cfgs[n].to_dict(), str(out[n]), threads, progress, i) for i, n in enumerate(todo)]
    if workers == 1:
        for job in jobs:
            _train_one(job)
        return out
    from .stopping import worker_pool

    with worker_pool(workers, maxtasksperchild=1) as pool:  # SIGTERM/Ctrl-C: the workers stop with the parent
        for _ in pool.imap_unordered(_train_one, jobs):
            pass
    return out


def check_zoo_runs(scale: str, runs_dir: str | Path, device: str = "cpu", seeds: int | None = None,
                   corpus: str | None = None) -> None:
    """``train_zoo``'s first check, alone: ``RunFolderError`` if a run folder under ``runs_dir`` holds a run
    trained with other options than the scale's (``reproduce`` checks it before it writes anything)."""
    for name, cfg in zoo_configs(scale, device, seeds, corpus).items():
        _check_same_run(Path(runs_dir) / name, cfg)


def _check_same_run(run: Path, cfg: TrainConfig) -> None:
    """Refuse (``RunFolderError``) a run folder trained with other options than ``cfg`` (corpus, seed,
    tokens, ...): ``_finished`` looks at the step count only, so it would reuse it as if it were this run.
    ``device`` (results agree across devices) and ``lr`` (lowered on resume after divergence) may differ."""
    from interventions.zoo.train import RunFolderError, config_diff

    if not (run / "train_config.json").is_file():
        return
    diff = [k for k in config_diff(run, cfg) if k not in ("device", "lr")]
    if diff:
        raise RunFolderError(f"{run} holds a run trained with other options (differing: {diff}): pass another "
                             f"--out, or delete {run} to train it with these options")


def _finished(run: Path, cfg: TrainConfig) -> bool:
    """Whether ``run`` is complete: its last checkpoint is the final step, and step 0 and every checkpoint
    have their metrics line (a line lost from the middle makes it unfinished: the resume recomputes it)."""
    ckpts = list_checkpoints(run)  # verified, oldest first
    if not ckpts or ckpts[-1].name != f"step-{cfg.total_steps:08d}":
        return False
    logged = {m["step"] for m in read_metrics(run)}
    return {0, *(int(c.name.split("-")[1]) for c in ckpts)} <= logged
