"""Argument 1 (phase change) and the per-token-loss analysis, measured at every checkpoint.

For each model of the zoo and each of its checkpoints (in parallel worker processes): validation
loss, ICL score with its standard error, loss by token index, head scores, and per-token losses on a
fixed set of (example, token) pairs, one token per example. Then, per model:

* **windows** of the phase change, each the 10% -> 90% stretch of one rise (no padding) of a logistic
  fit in log tokens, significant against the trend alone (F-test, p < ``WINDOW_P``; ``rise_window``):
  ``icl_*`` from the ICL score (the paper's definition: where it
  falls, i.e. where its derivative is large) and ``induction_*`` from the best head's induction score.
  Each says whether it ends inside the run and how many checkpoints it holds.
* **precise ICL** (``icl_precise``): the ICL score on ``N_PRECISE`` windows at the checkpoints just
  before and after the ICL window, at 80% of the run and at its end (s.e. <= 0.04 nats), and each
  smeared model with its vanilla twin at equal tokens (their difference with a paired s.e.).
* **bump**: the non-convex stretch of the validation loss against log tokens (the detector's output
  for every model; see ``detect_bump``).
* **PCA** of the per-token-loss vectors, all models' checkpoints projected jointly, fit on
  checkpoints after warm-up (before it, PC1 is just the fall from the uniform distribution), and
  the angle by which each trajectory turns at attn-2l's ICL window.
* **transient**: attention entropy and previous-token attention of the query positions that predict the
  ICL score's early and late bands of tokens (``transient_bands``) at the checkpoints between 0.3M and 5M tokens, where the ICL score can turn positive (+0.18 nats in one
  calibration seed; not resolved in every run): what would cause such a bump.

ICL score: ``analysis.metrics.icl_from_losses`` with ``icl_band`` (mean loss of tokens 245-255 minus
that of tokens 20-30 at context 256, per window, then averaged; paired s.e. over windows); the
trainer's log uses the same definition on the same first windows, so the two agree.

Tables (``results/<run>/phase_change/``): ``checkpoints``, ``loss_by_index``, ``head_scores``,
``windows``, ``icl_precise``, ``pca``, ``pca_turn``, ``transient``, ``training``.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from interventions.analysis.metrics import icl_band, icl_band_losses, icl_from_losses, icl_indices
from interventions.primitives.loss import loss_by_position, loss_from_logits
from interventions.zoo.train import (RunFolderError, TrainConfig, build_source, latest_checkpoint, list_checkpoints,
                                     load_model, load_train_config)

from .common import ResultError, Results, owns_results, run_fingerprint
from .stopping import worker_pool
from .zoo import RUN_THREADS, smear_twins, split_run_name

N_PCA_PAIRS = 2048  # (example, token) pairs, one token from each of this many separate windows
# the pairs are drawn with this seed whatever the run's seed: every run on one corpus shares them, so the
# PCA of several seeds' runs is one space (with each run's own seed, seeds' pairs differed and a joint
# fit put each seed's runs on an arm of their own). 0: the pairs seed-0 runs always had.
PCA_PAIRS_SEED = 0
N_PRECISE = 2048  # windows for the before/after/plateau ICL points (s.e. ~0.02-0.03 nats)
# the points ``precise_icl`` takes (part of its table's key: a table of fewer points is recomputed)
PRECISE_POINTS = ("before", "after", "at_80pct", "final", "attn1l_at_before", "smear_compare")
MIN_INDUCTION_RISE = 0.1  # best induction score (attention share) must rise this much for a window
MIN_ICL_DROP = 0.15  # nats: smaller ICL changes are not called a phase change (cf. the paper's ~0.4)
# a window's rise must also be significant: the logistic fit against the trend alone, F-test at this level.
# 0.05, not 0.01: the short runs' windows (19 checkpoints in the fit) had p = 0.004-0.007 in the GPU run, the
# tiny preset's (9) p = 0.05; noise about a trend (60 checkpoints, s.d. 0.03) passes it with a fitted rise of at
# least MIN_ICL_DROP in 1 of 40 seeded trials (3 of 40 without the test)
WINDOW_P = 0.05
PCA_FIT_FROM_TOKENS = 1_000_000  # PCs fit on checkpoints after warm-up
# windows are fit to checkpoints from here on: before it the loss is still falling from uniform and the
# ICL score swings with it (the smeared models change phase right after, at ~1.3M tokens)
FIT_FROM_TOKENS = 500_000


def run_config(run: Path) -> TrainConfig:
    return load_train_config(Path(run))


def run_source(run: Path, cfg: TrainConfig | None = None):
    """The run's token source (``build_source``), refusing (``ResultError``, before any evaluation) a corpus
    whose content differs from the one the run was trained on (``check_corpus``)."""
    cfg = run_config(run) if cfg is None else cfg
    source, _, fp = build_source(cfg)
    check_corpus(run, fp)
    return source


def check_corpus(run: Path, fp: dict) -> None:
    """Raise ``ResultError`` if the corpus fingerprint ``fp`` (``build_source``'s) differs from the one in the
    run's ``provenance.json``: evaluation windows come from the corpus as it is now, so results on an edited
    corpus would belong to no training run (and cached tables, keyed on the run, would silently disagree
    with a recomputation). Runs without a recorded fingerprint (synthetic corpora) pass."""
    path = Path(run) / "provenance.json"
    try:
        saved = (json.loads(path.read_text(encoding="utf-8")).get("corpus") or {}) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ResultError(f"{path} is garbled ({e}): restore it from the run") from None
    if saved.get("sha256") and fp.get("sha256") and saved["sha256"] != fp["sha256"]:
        raise ResultError(f"the corpus {fp.get('source')!r} has changed since {run} was trained (content hash "
                          f"{saved['sha256'][:12]}, {saved.get('n_documents')} documents then; {fp['sha256'][:12]}, "
                          f"{fp.get('n_documents')} now): its evaluation windows would come from other text. "
                          "Restore that corpus, or train a new run on this one")


def check_corpora(runs: dict[str, Path]) -> None:
    """``check_corpus`` for every run, each distinct corpus built once."""
    built: dict[tuple, dict] = {}
    for run in runs.values():
        cfg = run_config(run)
        key = (cfg.corpus, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.max_files)
        if key not in built:
            built[key] = build_source(cfg)[2]
        check_corpus(run, built[key])


def step_tokens(ckpt: Path, cfg: TrainConfig) -> tuple[int, int]:
    step = int(ckpt.name.split("-")[1])
    return step, step * cfg.batch_size * cfg.n_ctx


def eval_windows(cfg: TrainConfig, n: int, source=None) -> torch.Tensor:
    """The run's validation windows: the first ``cfg.n_eval_windows`` are those the trainer logs on.
    ``source``: the run's token source when already built (``build_source(cfg)[0]``)."""
    source = build_source(cfg)[0] if source is None else source
    return source.eval_windows(n, cfg.n_ctx, seed=cfg.seed)


def pca_pairs(cfg: TrainConfig, n: int = N_PCA_PAIRS, source=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows (n, n_ctx), targets (n,)): one token index in [1, n_ctx) per separate window; the same
    for every run on one corpus and context (``PCA_PAIRS_SEED``, not the run's seed)."""
    source = build_source(cfg)[0] if source is None else source
    windows = source.eval_windows(n, cfg.n_ctx, seed=PCA_PAIRS_SEED + 1)
    g = np.random.default_rng([PCA_PAIRS_SEED, 7])
    return windows, torch.from_numpy(g.integers(1, cfg.n_ctx, size=n))


def pairs_fingerprint(windows: torch.Tensor, targets: torch.Tensor) -> str:
    """A short hash of the PCA pairs: runs whose per-token losses may share one PCA have equal ones."""
    import hashlib

    return hashlib.sha256(windows.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(n, pos-1) per-token losses by plain forwards (clean runs need no tracing), on the CPU; each batch
    of ``windows`` (on any device) runs on the model's."""
    device = next(model.parameters()).device
    return torch.cat([loss_from_logits(model(x).logits, x).cpu()
                      for x in (b.to(device) for b in windows.split(batch_size))])


@torch.no_grad()
def pair_losses(model, windows: torch.Tensor, targets: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Loss of token ``targets[i]`` of window i (predicted from the tokens before it), (n,).

    Windows are cut after their target (causal attention: later tokens cannot change it) and run
    in batches of similar length, so the cost is ~half of full windows; each batch runs on the model's
    device (``windows`` and ``targets`` on the CPU)."""
    device = next(model.parameters()).device
    order = torch.argsort(targets)
    out = torch.empty(len(targets))
    for idx in order.split(batch_size):
        t = targets[idx]
        x = windows[idx, : int(t.max()) + 1]
        lp = torch.log_softmax(model(x.to(device)).logits.float(), -1)  # (b, L, vocab)
        rows = torch.arange(len(idx))
        out[idx] = -lp[rows, t - 1, x[rows, t]].cpu()  # (CPU index tensors are valid on any device)
    return out.numpy()


def probe_kwargs(model) -> dict:
    """Probe tokens for head scores, by model: byte-level models (vocab 257, separator 256) get
    printable ASCII (32-126) with the separator as BOS; small synthetic vocabularies use every id;
    other models the scores' defaults. Sequence lengths shrink to fit short contexts."""
    c = model.config
    n_ctx = getattr(c, "n_ctx", None) or getattr(c, "max_position_embeddings", 1024)
    kw: dict = {"seq_len": min(50, (n_ctx - 1) // 2), "prefix_tokens": min(25, (n_ctx - 1) // 4)}
    if c.model_type == "attn_only" and c.vocab_size == 257:
        kw.update(bos_id=256, vocab_range=(32, 127))
    elif c.vocab_size < 1000:
        kw.update(bos_id=0, vocab_range=(1, c.vocab_size), exclude_top=0.0)
        kw["seq_len"] = min(kw["seq_len"], c.vocab_size - 2)
        kw["prefix_tokens"] = min(kw["prefix_tokens"], c.vocab_size - 2)
    return kw


def head_score_frame(model, windows: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """Every score of every head (wide: one row per head), with the library's probe settings."""
    from interventions.analysis import scores

    return scores.head_scores(model, windows=windows[:16], seed=seed, **probe_kwargs(model))


def induction_heads_of(model, windows: torch.Tensor, seed: int = 0) -> list:
    """The induction heads by the library's one rule (``classify_induction_heads``: prefix matching
    and copying, as the paper defines them)."""
    from interventions.engine.heads import Head
    from interventions.analysis import scores

    df = scores.classify_induction_heads(head_score_frame(model, windows, seed))
    return [Head(int(r.layer), int(r.head)) for r in df[df.is_induction].itertuples()]


def head_score_rows(model, windows: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    """Induction, prefix-matching, copying and previous-token scores of every head (long format)."""
    df = head_score_frame(model, windows, seed)
    keep = [c for c in ("induction", "prefix_matching", "previous_token", "copying", "duplicate_token")
            if c in df.columns]
    return df.melt(id_vars=["layer", "head"], value_vars=keep, var_name="score", value_name="value")


def icl_row(losses: torch.Tensor) -> dict:
    """ICL score (banded, the experiments' definition) and the paper's single-token score, with s.e."""
    pos = losses.shape[1] + 1
    early, late = icl_indices(pos)
    b, s = icl_from_losses(losses, early, late, icl_band(pos)), icl_from_losses(losses, early, late)
    return {"icl_score": b["icl_score"], "icl_sem": b["sem"], "icl_early": b["loss_early"],
            "icl_late": b["loss_late"], "icl_single": s["icl_score"], "icl_single_sem": s["sem"], "icl_n": b["n"]}


# ----------------------------------------------------------------------------- per-checkpoint work

def pca_checkpoints(tokens: list[int], min_log_step: float = 0.04) -> set[int]:
    """Indices of the checkpoints whose per-token losses enter the PCA: a log-spaced thinning (each
    at least ``min_log_step`` decades of tokens after the previous one, ~10%), always the last.

    >>> sorted(pca_checkpoints([1, 2, 3, 100, 105, 111, 120]))
    [0, 1, 2, 3, 5, 6]
    """
    keep, last = set(), -math.inf
    for i, t in enumerate(tokens):
        x = math.log10(max(t, 1))
        if x - last >= min_log_step or i == len(tokens) - 1:
            keep.add(i)
            last = x
    return keep


def _eval_chunk(job) -> list[dict]:
    """Worker: evaluate some checkpoints of one run. Returns one dict of results per checkpoint
    (``pca`` is None for checkpoints thinned out of the PCA)."""
    from .zoo import torch_threads

    run, ckpts, n_windows, n_pairs, device, threads, pca_steps = job
    with torch_threads(threads):
        return _eval_checkpoints(run, ckpts, n_windows, n_pairs, device, pca_steps)


def _eval_checkpoints(run, ckpts, n_windows, n_pairs, device, pca_steps) -> list[dict]:
    cfg = run_config(Path(run))
    source = build_source(cfg)[0]  # its corpus checked against the run's before the jobs (check_corpora)
    windows = eval_windows(cfg, n_windows, source)
    with_pca = n_pairs > 0
    pw, pt = pca_pairs(cfg, n_pairs, source) if with_pca else (None, None)
    pairs = pairs_fingerprint(pw, pt) if with_pca else ""
    out = []
    for ckpt in ckpts:
        ckpt = Path(ckpt)
        step, tokens = step_tokens(ckpt, cfg)
        model = load_model(ckpt, device)
        losses = window_losses(model, windows)
        out.append({"step": step, "tokens": tokens, "val_loss": losses.mean().item(), **icl_row(losses),
                    "by_index": loss_by_position(losses).drop(columns="n"),
                    "heads": head_score_rows(model, windows, cfg.seed),
                    "pca": pair_losses(model, pw, pt) if with_pca and step in pca_steps else None, "pairs": pairs})
    return out


def _pool_iter(fn, jobs: list, workers: int, progress: bool, desc: str, total: int):
    """``fn`` over ``jobs`` (in spawned processes when workers > 1), each result yielded as soon as it and
    every job before it are done, with one progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not progress, unit="ckpt")
    try:
        if workers <= 1:
            for job in jobs:
                r = fn(job)
                bar.update(len(r))
                yield r
        else:
            with worker_pool(workers) as pool:  # SIGTERM/Ctrl-C: the workers stop with the parent
                for r in pool.imap(fn, jobs):
                    bar.update(len(r))
                    yield r
    finally:
        bar.close()


def _write_evaluated(res: Results, name: str, rows: list[dict], key: dict) -> None:
    """The per-checkpoint tables of one model (``checkpoints_<name>`` last: it marks the model done)."""
    rows = sorted(rows, key=lambda r: r["step"])
    res.write(f"loss_by_index_{name}", pd.concat([r["by_index"].assign(model=name, step=r["step"], tokens=r["tokens"])
                                                  for r in rows]), inputs=key)
    res.write(f"head_scores_{name}", pd.concat([r["heads"].assign(model=name, step=r["step"], tokens=r["tokens"])
                                                for r in rows]), inputs=key)
    res.write_array(f"per_token_losses_{name}", np.stack([r["pca"] for r in rows if r["pca"] is not None]),
                    inputs=key)
    res.write(f"pca_steps_{name}", pd.DataFrame({"step": [r["step"] for r in rows if r["pca"] is not None],
                                                 "pairs": [r["pairs"] for r in rows if r["pca"] is not None]}),
              inputs=key)
    table = pd.DataFrame([{"model": name, **{k: v for k, v in r.items() if k not in ("by_index", "heads", "pca", "pairs")}}
                          for r in rows])
    res.write(f"checkpoints_{name}", table, inputs=key)


@owns_results()
def run_phase_change(runs: dict[str, Path], results_root: Path, n_windows: int = 256, device: str = "cpu",
                     progress: bool = True, workers: int | None = None, n_precise: int = N_PRECISE,
                     n_pca_pairs: int = N_PCA_PAIRS) -> Results:
    """Evaluate every checkpoint of every run (skipping models already done), then windows, precise
    ICL points, PCA and the transient."""
    from .zoo import default_workers

    workers = workers or default_workers(device)
    res = Results(results_root, "phase_change")
    # settings shared by every table; each run's tables are keyed on the run's content (so runs can be added)
    for run in runs.values():  # every run's config parses (a garbled one is named) before any work
        run_config(run)
    check_corpora(runs)  # and a corpus edited since a run was trained is refused, before anything is written
    for run in runs.values():  # and so is a run with nothing to evaluate
        if latest_checkpoint(run) is None:
            raise RunFolderError(f"{run} has no complete checkpoint (none with a verified manifest): train it "
                                 "first, or resume it with `train --resume`")
    settings = {"n_windows": n_windows, "n_precise": n_precise, "n_pca_pairs": n_pca_pairs,
                "pca_pairs_seed": PCA_PAIRS_SEED}
    res.write_provenance(settings, runs={k: str(v) for k, v in runs.items()})
    keys = {name: {"run": run_fingerprint(run), **settings} for name, run in runs.items()}
    per_run = ("checkpoints_{}", "loss_by_index_{}", "head_scores_{}", "pca_steps_{}")
    todo = [name for name in runs if not (res.has_all([t.format(name) for t in per_run], keys[name])
                                          and res.has_array(f"per_token_losses_{name}", keys[name]))]
    jobs, owners = [], []
    threads = RUN_THREADS  # as the training: --workers changes no number
    for name in todo:
        ckpts = [str(c) for c in list_checkpoints(runs[name])]  # at least one (checked above)
        cfg = run_config(runs[name])
        steps = [step_tokens(Path(c), cfg) for c in ckpts]
        pca_steps = {steps[i][0] for i in pca_checkpoints([t for _, t in steps])}
        n_chunks = max(1, min(len(ckpts), 2 * workers))
        for chunk in np.array_split(np.array(ckpts), n_chunks):
            jobs.append((str(runs[name]), list(chunk), n_windows, n_pca_pairs, device, threads,
                         pca_steps))
            owners.append(name)
    # each model's tables are written as soon as its last chunk is in: an interrupted evaluation resumes
    # at the first model not written
    chunks: dict[str, list] = {name: [] for name in todo}
    left = {name: owners.count(name) for name in todo}
    # closing: an error or a signal here stops the workers before the results folder's lock is released
    with contextlib.closing(_pool_iter(_eval_chunk, jobs, workers, progress, "evaluate checkpoints",
                                       sum(len(j[1]) for j in jobs))) as evaluated:
        for owner, chunk in zip(owners, evaluated):
            chunks[owner].append(chunk)
            left[owner] -= 1
            if left[owner] == 0:
                _write_evaluated(res, owner, [r for c in chunks.pop(owner) for r in c], keys[owner])
    ck = pd.concat([res.read(f"checkpoints_{n}") for n in runs])
    hs = pd.concat([res.read(f"head_scores_{n}") for n in runs])
    res.write("checkpoints", ck)
    res.write("head_scores", hs)
    res.write("loss_by_index", pd.concat([res.read(f"loss_by_index_{n}") for n in runs]))
    res.write("training", training_table(runs))
    win = detect_windows(ck, hs)
    all_key = {n: keys[n]["run"] for n in runs}  # the tables over all runs are keyed on every run
    # the precise points sit at the windows' edges: keyed on those too (a changed window rule recomputes)
    edges = {r.model: [None if not np.isfinite(v) else round(v) for v in (r.icl_window_start_tokens,
                                                                          r.icl_window_end_tokens)]
             for r in win.itertuples()}
    precise_key = all_key | {"icl_window_edges": edges, "points": PRECISE_POINTS}
    if not res.has("icl_precise", precise_key):
        res.write("icl_precise", precise_icl(runs, win, n_precise, device), inputs=precise_key)
    vectors = {n: res.read_array(f"per_token_losses_{n}") for n in runs}
    steps = {n: res.read(f"pca_steps_{n}") for n in runs}
    pca_ck = pd.concat([ck[(ck.model == n) & ck.step.isin(steps[n].step)] for n in runs])
    res.write("pca", pca_by_pairs(vectors, pca_ck, {n: steps[n].pairs.iloc[0] for n in runs if len(steps[n])}))
    derive_windows(res)
    # keyed on the query positions too: tables of the old bands (positions < early + 5, >= late - 5) recompute
    transient_key = all_key | {"transient_bands": {n: transient_bands(run_config(r).n_ctx) for n, r in runs.items()}}
    if not res.has("transient", transient_key):
        res.write("transient", transient_table(runs, ck, device), inputs=transient_key)
    return res


def evaluation_interrupted(res: Results) -> bool:
    """Whether the last ``run_phase_change`` into ``res`` stopped after it wrote tables and before it derived
    the windows from them (a table but ``pca_turn`` and ``transient``, written after it, is newer than
    ``windows``): the tables are then of two evaluations (e.g. the checkpoints of a run as it is now, the
    windows of it as it was)."""
    w = res.invocation_of("windows")
    return w is not None and any((res.invocation_of(t) or 0) > w for t in res.tables()
                                 if t not in ("windows", "pca_turn", "transient"))


def derive_windows(res: Results) -> pd.DataFrame:
    """The tables derived from the evaluated ones alone, (re)written: ``windows`` (with the plateau test)
    and ``pca_turn``. Refuses when the precise ICL points were taken at other windows than these (they
    need the checkpoints: evaluate again)."""
    ck, prec = res.read("checkpoints"), res.read("icl_precise")
    win = add_plateau(detect_windows(ck, res.read("head_scores")), prec)
    for _, w in win.iterrows():
        tokens = np.sort(ck[ck.model == w.model].tokens.to_numpy())
        at = {"before": w.icl_window_start_tokens, "after": w.icl_window_end_tokens}
        for point in ("before", "after"):
            got = [int(x) for x in prec[(prec.model == w.model) & (prec.point == point)].tokens]
            want = ([int(tokens[edge_index(tokens, at[point], point)])]
                    if np.isfinite(at[point]) and split_run_name(w.model)[0] == "attn-2l" else [])
            if got != want:
                raise ResultError(f"{w.model}: the precise ICL point {point!r} was taken at {got} tokens; the "
                                 f"windows now put it at {want}: evaluate the runs again (`phase-change` or "
                                 "`reproduce`)")
    res.write("windows", win)
    pca = res.read_optional("pca")
    if pca is not None:
        res.write("pca_turn", pca_turns(pca, win))
    return win


def edge_index(tokens, at: float, point: str) -> int:
    """Index of the checkpoint taken for a window edge ``at`` among checkpoints at ``tokens`` (sorted):
    the last at/before it ("before"; the first when none is), the first at/after it ("after"; the last
    when none is).

    >>> edge_index([1, 5, 9], 6, "before"), edge_index([1, 5, 9], 6, "after"), edge_index([1, 5, 9], 0, "before")
    (1, 2, 0)
    """
    tokens = np.asarray(tokens)
    if point == "before":
        return int(np.nonzero(tokens <= at)[0][-1]) if (tokens <= at).any() else 0
    return int(np.nonzero(tokens >= at)[0][0]) if (tokens >= at).any() else len(tokens) - 1


def edge_checkpoint(ckpts: list[Path], cfg: TrainConfig, at: float, point: str) -> Path:
    """The checkpoint of a run (``list_checkpoints``, in step order) taken for a window edge (``edge_index``)."""
    return ckpts[edge_index([step_tokens(c, cfg)[1] for c in ckpts], at, point)]


def training_table(runs: dict[str, Path]) -> pd.DataFrame:
    """The trainer's metrics.jsonl of every run (step, tokens, losses, ICL, repeated-token check),
    with the wall-clock seconds since the run started at each checkpoint (from checkpoint times)."""
    from interventions.zoo.train import read_metrics

    frames = []
    for name, run in runs.items():
        df = pd.DataFrame(read_metrics(run)).assign(model=name)
        t0 = (run / "train_config.json").stat().st_mtime
        wall = {int(c.name.split("-")[1]): c.stat().st_mtime - t0 for c in list_checkpoints(run)}
        df["wall_s"] = df.step.map(wall)
        frames.append(df)
    return pd.concat(frames)


# ----------------------------------------------------------------------------- windows and bump

def _smooth(y: np.ndarray) -> np.ndarray:
    """3-point moving average (edges padded): single-checkpoint noise must not set a window."""
    return np.convolve(np.pad(y, 1, mode="edge"), np.ones(3) / 3, mode="valid") if len(y) >= 3 else y


def _sigmoid(z: np.ndarray, r: float = 1.0) -> np.ndarray:
    """r * sigmoid(z) as r / (1 + exp(-z)) with the exponent capped at 700: exp overflowed (a RuntimeWarning)
    past ~709.8 on steep sigmoids, where this is 0 to within 1e-304 |r|. Elsewhere the plain formula's bits:
    r * expit(z) rounds differently, which moved least_squares' fits by up to 2e-7."""
    return r / (1 + np.exp(np.minimum(-z, 700.0)))


def _grid_sse(x: np.ndarray, y: np.ndarray, ws: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """(len(ws) * len(cs),) residual sum of squares of the least-squares fit of y = a + b x + r s(x) for each
    sigmoid s = sigmoid((x - c) / w) of the grid (w outer, c inner): y and s with the line (1, x)
    projected out, the best r removes <s, y>^2 / <s, s> of y's sum of squares (none where s is a line)."""
    q, _ = np.linalg.qr(np.stack([np.ones_like(x), x - x[0]], 1))  # (n, 2) orthonormal basis of the line
    s = _sigmoid((x[None, None, :] - cs[None, :, None]) / ws[:, None, None])  # (w, c, n)
    s = s.reshape(-1, len(x))
    s = s - (s @ q) @ q.T
    yp = y - q @ (q.T @ y)
    num, den = s @ yp, (s ** 2).sum(1)
    ok = den > 1e-12 * len(x)
    return float(yp @ yp) - np.where(ok, num ** 2 / np.where(ok, den, 1.0), 0.0)


def logistic_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Least-squares fit of y = a + b (x - x0) + r * sigmoid((x - c) / w), x0 = x[0]:
    a sharp rise r at c of width w on top of a slow linear trend b (learning goes on before and after
    a phase change). Returns (a, b, r, c, w, rms residual).

    Grid over (c, w) with (a, b, r) solved in closed form (y is linear in them), then polished by
    scipy's least squares from the grid's best (kept only if it improves the fit): the optimiser
    cannot start badly. The grid's residuals come in one pass (``_grid_sse``); its best point is
    solved again with ``lstsq``."""
    dx = x - x[0]

    def design(c, w):
        return np.stack([np.ones_like(x), dx, _sigmoid((x - c) / w)], 1)

    span = x[-1] - x[0]
    ws, cs = np.geomspace(0.005, 0.3, 30), np.linspace(x[0], x[-1], 100)
    k = int(np.argmin(_grid_sse(x, y, ws, cs)))  # the first of equal ones, in (w, c) order
    c, w = float(cs[k % len(cs)]), float(ws[k // len(cs)])
    A = design(c, w)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    (a, b, r), sse = map(float, coef), float(((A @ coef - y) ** 2).sum())
    from scipy.optimize import least_squares

    def resid(p):
        return p[0] + p[1] * dx + _sigmoid((x - p[3]) / p[4], p[2]) - y

    try:
        fit = least_squares(resid, [a, b, r, c, w], bounds=([-np.inf, -np.inf, -np.inf, x[0] - 0.1 * span, 2e-3],
                                                             [np.inf, np.inf, np.inf, x[-1] + 0.1 * span, 1.0]))
        if fit.success and float((fit.fun ** 2).sum()) < sse:
            (a, b, r, c, w), sse = fit.x.tolist(), float((fit.fun ** 2).sum())
    except ValueError:  # non-finite residuals: keep the grid's answer
        pass
    return a, b, r, c, w, math.sqrt(sse / len(x))


def rise_significance(x: np.ndarray, y: np.ndarray, rms: float) -> float:
    """p-value of the F-test of ``logistic_fit`` (5 parameters, residual rms ``rms``) against the trend alone
    (y = a + b x, 2 parameters, least squares) on the same n points: F = ((SSE_trend - SSE_fit) / 3) /
    (SSE_fit / (n - 5)) on (3, n - 5) degrees of freedom. NaN with fewer than 6 points (a 5-parameter fit
    of 5 points leaves no residual to judge it by).

    The sigmoid's centre and width are chosen by the fit and are undefined under the null, so F's
    reference distribution is only approximate and slightly liberal (on noise about a linear trend, 60
    log-spaced points, p < 0.01 in ~2% of 300 trials, p < 0.05 in ~13%: a window also needs its rise).

    >>> x = np.linspace(6, 7, 20); s = 1 / (1 + np.exp(-(x - 6.5) / 0.05))
    >>> rise_significance(x, s, logistic_fit(x, s)[-1]), rise_significance(x, 2 * x, 0.0), rise_significance(x[:5], x[:5], 0.0)
    (0.0, 1.0, nan)
    """
    from scipy import stats

    n = len(x)
    if n < 6:
        return math.nan
    A = np.stack([np.ones_like(x), x - x[0]], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    sse0, sse1 = float(((A @ coef - y) ** 2).sum()), n * rms ** 2
    if sse0 <= 1e-20 * float(((y - y.mean()) ** 2).sum() + (y ** 2).sum()):  # the trend alone fits exactly
        return 1.0
    if sse1 <= 1e-12 * sse0:  # the logistic fits exactly where the trend does not
        return 0.0
    return float(stats.f.sf(max(sse0 - sse1, 0.0) / 3 / (sse1 / (n - 5)), 3, n - 5))


def rise_window(tokens: np.ndarray, y: np.ndarray, min_rise: float, fit_from_tokens: float = 0.0,
                p_level: float = WINDOW_P) -> dict:
    """The 10% -> 90% stretch of the sharp rise of ``y`` against log tokens, from a fit.

    ``logistic_fit`` (a logistic in log10 tokens on top of a linear trend) is fit by least squares to
    the checkpoints with at least ``fit_from_tokens`` tokens; the window is where the logistic part
    passes 10% and 90% of its rise, ``c -+ w ln 9``: the stretch where the derivative is large, read
    off a fit rather than off differences of noisy neighbouring checkpoints (at 0.2M-token spacing,
    the s.e. of one checkpoint's ICL score swamps the difference to the next), and apart from the slow
    learning before and after. Not padded to checkpoints. No window (NaNs) when the fitted rise is
    below ``min_rise`` (or is a fall), when it is not significant (``p_value``: ``rise_significance``,
    the logistic fit against the linear trend alone, F-test; a window needs p < ``p_level``, 0.05:
    ``min_rise`` alone let noise through), or when its 10% point comes before the first fitted checkpoint
    (the rise began before the data, or the fit traded a slow trend for an extrapolated rise: on one
    1-layer run it claimed 0.15M - 116M tokens from data at 0.55M - 20M). ``ends_inside``: the 90% point comes before
    the last checkpoint by at least half the window's own width in log tokens (a plateau after it was
    observed; a curve still rising at the end of the run has its 90% point at or beyond the end).

    >>> t = np.geomspace(1e6, 1e8, 60); y = 1 / (1 + np.exp(-(np.log10(t) - 7) / 0.1))
    >>> w = rise_window(t, y, 0.5); round(w["start_tokens"] / 1e6, 1), round(w["end_tokens"] / 1e6, 1)
    (6.0, 16.6)
    """
    nan = {"start_tokens": math.nan, "end_tokens": math.nan, "peak_tokens": math.nan, "rise": 0.0,
           "trend_per_decade": math.nan, "from": math.nan, "to": math.nan, "n_checkpoints": 0,
           "ends_inside": False, "fit_rms": math.nan, "p_value": math.nan}
    keep = tokens >= fit_from_tokens
    t, y = tokens[keep].astype(float), np.asarray(y, dtype=float)[keep]
    if len(t) < 5:
        return nan
    x = np.log10(t)
    a, b, r, c, w, rms = logistic_fit(x, y)
    p = rise_significance(x, y, rms)
    start, end = c - w * math.log(9), c + w * math.log(9)
    if r < min_rise or not p < p_level or start < x[0]:
        return {**nan, "rise": float(r), "fit_rms": rms, "p_value": p}
    return {"start_tokens": 10 ** start, "end_tokens": 10 ** end, "peak_tokens": 10 ** c, "rise": float(r),
            "trend_per_decade": float(b), "from": float(a + b * (start - x[0]) + 0.1 * r),
            "to": float(a + b * (end - x[0]) + 0.9 * r),
            "n_checkpoints": int(((x >= start) & (x <= end)).sum()),
            "ends_inside": bool(x[-1] - end >= 0.5 * (end - start)), "fit_rms": rms, "p_value": p}


def detect_bump(tokens: np.ndarray, loss: np.ndarray, after_fraction: float = 0.05) -> dict:
    """The loss curve's non-convex stretch: where validation loss against log tokens bends downwards
    (second difference < 0 after 3-point smoothing), the most concave stretch after ``after_fraction``
    of the run (the initial fall from uniform is excluded). Returns ``bump`` (whether such a stretch
    exists), its ``bump_start_tokens`` / ``bump_end_tokens`` and ``bump_curvature`` (the most negative
    second derivative of smoothed loss against log10 tokens, nats per decade squared).

    Reported for every model: a detector that also fires on a model without a phase change (e.g. on
    noise) says how much the bump of another model means."""
    if len(tokens) < 5:
        return {"bump": False, "bump_start_tokens": math.nan, "bump_end_tokens": math.nan, "bump_curvature": math.nan}
    x = np.log10(tokens.astype(float))
    ys = _smooth(loss.astype(float))
    curv = np.gradient(np.gradient(ys, x), x)
    first = int(np.searchsorted(x, x[-1] + np.log10(after_fraction)))
    j = first + int(np.argmin(curv[first:]))
    if curv[j] >= 0:
        return {"bump": False, "bump_start_tokens": math.nan, "bump_end_tokens": math.nan,
                "bump_curvature": float(curv[j])}
    lo = hi = j
    while lo > first and curv[lo - 1] < 0:
        lo -= 1
    while hi < len(x) - 1 and curv[hi + 1] < 0:
        hi += 1
    return {"bump": True, "bump_start_tokens": float(10 ** x[lo]), "bump_end_tokens": float(10 ** x[hi]),
            "bump_curvature": float(curv[j])}


def detect_windows(checkpoints: pd.DataFrame, head_scores: pd.DataFrame) -> pd.DataFrame:
    """Per model: the ICL window (10-90% of the ICL score's fall), the induction window (10-90% of the
    best head's induction-score rise), the loss bump, and where the run ends."""
    rows = []
    for model, ck in checkpoints.groupby("model", sort=False):
        ck = ck[ck.tokens > 0].sort_values("tokens")
        t = ck.tokens.to_numpy()
        ind = (head_scores[(head_scores.model == model) & (head_scores.score == "induction")]
               .groupby("tokens").value.max().reindex(ck.tokens).fillna(0).to_numpy())
        w_icl = rise_window(t, -ck.icl_score.to_numpy(), MIN_ICL_DROP, FIT_FROM_TOKENS)
        w_ind = rise_window(t, ind, MIN_INDUCTION_RISE, FIT_FROM_TOKENS)
        rows.append({"model": model, "run_tokens": int(t[-1]),
                     **{f"icl_window_{k}": v for k, v in w_icl.items()},
                     **{f"induction_window_{k}": v for k, v in w_ind.items()},
                     **detect_bump(t, ck.val_loss.to_numpy()),
                     "final_induction_score": float(ind[-1]), "final_icl": float(ck.icl_score.iloc[-1]),
                     "final_icl_sem": float(ck.icl_sem.iloc[-1])})
    return pd.DataFrame(rows)


def precise_icl(runs: dict[str, Path], windows: pd.DataFrame, n: int, device: str) -> pd.DataFrame:
    """ICL on ``n`` windows at: the checkpoint at/before the ICL window's start ("before"), at/after its
    end ("after"), at 80% of the run ("at_80pct") and the last ("final"). Paired differences between
    points on the same windows ("*_minus_*" rows) have their own, smaller s.e. Also attn-1l at attn-2l's
    "before" tokens and the paired difference there (``_one_layer_at_before``), and each smeared run with
    its vanilla twin at equal tokens (``_smeared_vs_vanilla``)."""
    rows, before, seen = [], {}, {}  # seen: the points evaluated, by checkpoint (``_point_icl``)
    for name, run in runs.items():
        cfg = run_config(run)
        ckpts = list_checkpoints(run)
        w = windows[windows.model == name].iloc[0]
        points = {"at_80pct": edge_checkpoint(ckpts, cfg, 0.8 * step_tokens(ckpts[-1], cfg)[1], "before"), "final": ckpts[-1]}
        if np.isfinite(w.icl_window_start_tokens):
            points = {"before": edge_checkpoint(ckpts, cfg, w.icl_window_start_tokens, "before"),
                      "after": edge_checkpoint(ckpts, cfg, w.icl_window_end_tokens, "after"), **points}
        if split_run_name(name)[0] != "attn-2l":
            points = {"final": points["final"]}
        wins = eval_windows(cfg, n)
        per_window = {}
        for point, ckpt in points.items():
            r, per_window[point] = _point_icl(ckpt, wins, device, seen)  # per window: paired differences use these
            rows.append({"model": name, "point": point, "step": step_tokens(ckpt, cfg)[0],
                         "tokens": step_tokens(ckpt, cfg)[1], "icl_score": r["icl_score"], "icl_sem": r["sem"], "n": n})
        for a, b in (("after", "before"), ("final", "at_80pct")):
            if a in per_window and b in per_window:
                d = per_window[a] - per_window[b]
                rows.append({"model": name, "point": f"{a}_minus_{b}", "step": -1, "tokens": -1,
                             "icl_score": float(d.mean()), "icl_sem": float(d.std() / math.sqrt(len(d))), "n": n})
        before[name] = per_window.get("before"), points.get("before"), cfg
    rows += _one_layer_at_before(runs, before, n, device, seen)
    rows += _smeared_vs_vanilla(runs, n, device, seen)
    return pd.DataFrame(rows)


def _point_icl(ckpt: Path, wins: torch.Tensor, device: str, seen: dict | None = None) -> tuple[dict, torch.Tensor]:
    """ICL score (``icl_from_losses``: score, s.e.) of a checkpoint on ``wins``, and the (n,) per-window
    scores (late band minus early band) that paired differences between points are taken of. ``seen``:
    {checkpoint: (windows, score, per window)} of the points already evaluated, reused on equal windows."""
    if seen is not None and str(ckpt) in seen and torch.equal(seen[str(ckpt)][0], wins):
        return seen[str(ckpt)][1:]
    out = _evaluate_point(ckpt, wins, device)
    if seen is not None:
        seen[str(ckpt)] = (wins, *out)
    return out


def _evaluate_point(ckpt: Path, wins: torch.Tensor, device: str) -> tuple[dict, torch.Tensor]:
    losses = window_losses(load_model(ckpt, device), wins)
    pos = losses.shape[1] + 1
    early, late = icl_band_losses(losses, *icl_indices(pos), icl_band(pos))
    return icl_from_losses(losses, *icl_indices(pos), icl_band(pos)), late - early


def _one_layer_at_before(runs: dict[str, Path], before: dict, n: int, device: str, seen: dict | None = None
                         ) -> list[dict]:
    """The 1-layer control (attn-1l) at the tokens of attn-2l's "before" point, on the same windows, and
    the paired difference attn-2l minus attn-1l there: how much of the ICL score before the window a
    model that cannot form induction heads also has (point ``attn1l_at_before``). Each seed's attn-2l
    (``attn-2l-s<k>``) is paired with the same seed's attn-1l."""
    rows = []
    for two in (k for k in before if split_run_name(k)[0] == "attn-2l"):
        one = two.replace("attn-2l", "attn-1l")
        if one not in runs or before[two][0] is None:
            continue
        per2, ckpt2, cfg2 = before[two]
        cfg = run_config(runs[one])
        ckpt = edge_checkpoint(list_checkpoints(runs[one]), cfg, step_tokens(ckpt2, cfg2)[1], "before")
        wins = eval_windows(cfg, n)
        if not torch.equal(wins, eval_windows(cfg2, n)):
            continue  # different corpora or seeds: no paired comparison
        r, per1 = _point_icl(ckpt, wins, device, seen)
        d = per2 - per1
        rows += [{"model": one, "point": "attn1l_at_before", "step": step_tokens(ckpt, cfg)[0],
                  "tokens": step_tokens(ckpt, cfg)[1], "icl_score": r["icl_score"], "icl_sem": r["sem"], "n": n},
                 {"model": two, "point": "before_minus_attn1l", "step": -1, "tokens": -1, "icl_score": float(d.mean()),
                  "icl_sem": float(d.std() / math.sqrt(len(d))), "n": n}]
    return rows


def _smeared_vs_vanilla(runs: dict[str, Path], n: int, device: str, seen: dict | None = None) -> list[dict]:
    """Each smeared run and its vanilla twin (``smear_twins``) at the largest token count both were
    checkpointed at (one schedule, so the longer run's prefix is comparable), on the same ``n`` windows:
    each model's ICL there (point ``smear_compare``) and the paired difference smeared minus vanilla
    (point ``smear_minus_vanilla``, on the smeared run's row), whose s.e. pairs the windows."""
    rows = []
    for a, b in smear_twins(runs):
        cfgs = {m: run_config(runs[m]) for m in (a, b)}
        at = {m: {step_tokens(c, cfgs[m])[1]: c for c in list_checkpoints(runs[m])} for m in (a, b)}
        common = sorted(set(at[a]) & set(at[b]))
        wins = eval_windows(cfgs[b], n)
        if not common or not torch.equal(wins, eval_windows(cfgs[a], n)):
            continue  # no common checkpoint, or different corpora or seeds: no paired comparison
        t, per = common[-1], {}
        for m in (a, b):
            r, per[m] = _point_icl(at[m][t], wins, device, seen)
            rows.append({"model": m, "point": "smear_compare", "step": step_tokens(at[m][t], cfgs[m])[0],
                         "tokens": t, "icl_score": r["icl_score"], "icl_sem": r["sem"], "n": n})
        d = per[b] - per[a]
        rows.append({"model": b, "point": "smear_minus_vanilla", "step": -1, "tokens": t,
                     "icl_score": float(d.mean()), "icl_sem": float(d.std() / math.sqrt(len(d))), "n": n})
    return rows


def add_plateau(win: pd.DataFrame, precise: pd.DataFrame) -> pd.DataFrame:
    """Plateau test per model: the last 20% of the run moves the ICL score by less than 2 s.e.
    (the s.e. of the paired change between the 80% checkpoint and the end). No test (NaN) when the 80%
    point is the final checkpoint itself (a run with no checkpoint in its last 20%): its change is 0 +- 0."""
    win = win.copy()
    win["plateau_change"], win["plateau_sem"], win["plateaued"] = math.nan, math.nan, False
    for i, r in win.iterrows():
        p = precise[(precise.model == r.model) & (precise.point == "final_minus_at_80pct")]
        steps = [precise[(precise.model == r.model) & (precise.point == q)].step.tolist() for q in ("at_80pct", "final")]
        if len(p) and steps[0] != steps[1]:
            win.loc[i, ["plateau_change", "plateau_sem"]] = [p.icl_score.iloc[0], p.icl_sem.iloc[0]]
            win.loc[i, "plateaued"] = bool(abs(p.icl_score.iloc[0]) < 2 * p.icl_sem.iloc[0])
    return win


# ----------------------------------------------------------------------------- PCA

def pca_trajectories(vectors: dict[str, np.ndarray], checkpoints: pd.DataFrame,
                     fit_from_tokens: int = PCA_FIT_FROM_TOKENS) -> pd.DataFrame:
    """Project every checkpoint's per-token-loss vector (all models jointly) on 2 principal components
    fit on the checkpoints with at least ``fit_from_tokens`` tokens (all of them when none has)."""
    names = [n for n in vectors if vectors[n].size]
    if not names:
        return pd.DataFrame(columns=["model", "step", "tokens", "pc1", "pc2", "var_pc1", "var_pc2"])
    widths = {n: vectors[n].shape[1] for n in names}
    if len(set(widths.values())) > 1:
        raise ValueError(f"per-token-loss vectors of different lengths {widths}: losses on different pairs are "
                         "different coordinates; fit each set of pairs on its own (`pca_by_pairs`)")
    rows = {n: int((checkpoints.model == n).sum()) for n in names}
    if any(rows[n] != len(vectors[n]) for n in names):
        raise ValueError(f"checkpoint rows {rows} do not match the vectors' {({n: len(vectors[n]) for n in names})}: "
                         "pass the checkpoints of the PCA steps (the pca_steps tables) only")
    X = np.concatenate([vectors[n] for n in names])
    tok = np.concatenate([checkpoints[checkpoints.model == n].sort_values("step").tokens.to_numpy() for n in names])
    fit = X[tok >= fit_from_tokens] if (tok >= fit_from_tokens).sum() >= 3 else X
    mean = fit.mean(0)
    _, S, Vt = np.linalg.svd(fit - mean, full_matrices=False)
    pcs = (X - mean) @ Vt[:2].T
    var = (S[:2] ** 2 / (S ** 2).sum()).tolist() + [0.0, 0.0]
    rows, i = [], 0
    for n in names:
        ck = checkpoints[checkpoints.model == n].sort_values("step")
        for (_, r), v in zip(ck.iterrows(), pcs[i:i + len(vectors[n])]):
            rows.append({"model": n, "step": r.step, "tokens": r.tokens, "pc1": v[0], "pc2": v[1] if len(v) > 1 else 0.0,
                         "var_pc1": var[0], "var_pc2": var[1], "fit": r.tokens >= fit_from_tokens})
        i += len(vectors[n])
    return pd.DataFrame(rows)


def pca_by_pairs(vectors: dict[str, np.ndarray], checkpoints: pd.DataFrame, pairs: dict[str, str]) -> pd.DataFrame:
    """``pca_trajectories`` of the runs evaluated on the same PCA pairs (``pairs``: run -> fingerprint),
    one fit per set of pairs (column ``pairs``): losses on different tokens are different coordinates."""
    groups: dict[str, list[str]] = {}
    for name in vectors:
        if vectors[name].size and name not in pairs:
            raise ValueError(f"{name} has per-token losses but no pairs fingerprint: pass its `pairs_fingerprint` "
                             "(the `pairs` column of its pca_steps table)")
        groups.setdefault(pairs.get(name, ""), []).append(name)
    frames = [pca_trajectories({n: vectors[n] for n in names}, checkpoints).assign(pairs=fp)
              for fp, names in groups.items()]
    return pd.concat(frames, ignore_index=True)


def _point(d: pd.DataFrame, tokens: float) -> np.ndarray:
    j = int(np.argmin(np.abs(np.log(d.tokens.clip(lower=1).to_numpy()) - math.log(max(tokens, 1)))))
    return d[["pc1", "pc2"]].to_numpy()[j]


def turn_angle(d: pd.DataFrame, start: float, end: float) -> float:
    """Degrees between the trajectory's direction before a window (from start/2.5 to start) and across
    it (start to end), in the PC1-PC2 plane: 0 = straight on, 180 = reversal."""
    a, b, c = _point(d, start / 2.5), _point(d, start), _point(d, end)
    u, v = b - a, c - b
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return math.nan
    return float(np.degrees(np.arccos(np.clip(u @ v / (nu * nv), -1, 1))))


def pca_turns(pca: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """Every model's turn angle at attn-2l's ICL window (the same token counts for every model). With
    several seeds, each model's reference is the same seed's attn-2l (``<model>-s<k>`` -> ``attn-2l-s<k>``)."""
    rows = []
    for model, d in pca.groupby("model", sort=False):
        seed = split_run_name(model)[1]
        ref = windows[windows.model == ("attn-2l" if seed is None else f"attn-2l-s{seed}")]
        if ref.empty or not np.isfinite(ref.icl_window_start_tokens.iloc[0]):
            continue
        s, e = float(ref.icl_window_start_tokens.iloc[0]), float(ref.icl_window_end_tokens.iloc[0])
        d = d[d.tokens > 0].sort_values("tokens")
        ok = d.tokens.max() >= e
        rows.append({"model": model, "window_start_tokens": s, "window_end_tokens": e,
                     "turn_deg": turn_angle(d, s, e) if ok else math.nan})
    return pd.DataFrame(rows, columns=["model", "window_start_tokens", "window_end_tokens", "turn_deg"])


# ----------------------------------------------------------------------------- the early transient

@torch.no_grad()
def attention_entropy(model, windows: torch.Tensor) -> pd.DataFrame:
    """Mean attention entropy (nats) of every head at every query position, log(pos + 1) (the entropy
    of uniform attention over the visible tokens), and the attention weight on the previous token.
    Eager attention (patterns returned)."""
    out = model(windows, output_attentions=True)
    rows = []
    for layer, pat in enumerate(out.attentions):  # (batch, head, q, k)
        pat = pat.float().cpu()
        ent = -(pat.clamp_min(1e-12).log() * pat).sum(-1).mean(0)  # (head, q)
        prev = torch.diagonal(pat, offset=-1, dim1=-2, dim2=-1).mean(0)  # (head, q - 1): weight on token q - 1
        prev = torch.cat([torch.full((prev.shape[0], 1), float("nan")), prev], 1)
        for h in range(ent.shape[0]):
            rows.append(pd.DataFrame({"layer": layer, "head": h, "position": np.arange(ent.shape[1]),
                                      "entropy": ent[h].numpy(), "uniform_entropy": np.log(np.arange(ent.shape[1]) + 1),
                                      "prev_token_attention": prev[h].numpy()}))
    return pd.concat(rows)


def transient_bands(n_ctx: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((early_lo, early_hi), (late_lo, late_hi)): the 0-based query positions, both ends included, whose
    next-token predictions the ICL score's early and late bands average (``icl_band_losses``: tokens
    k - b .. k + b, 1-indexed, b = ``icl_band(n_ctx)``, clipped to 2 .. n_ctx; token t is predicted at
    position t - 2). ``attention_by_band`` calls them "early" and "late".

        >>> transient_bands(256)  # tokens 20-30 and 245-255
        ((18, 28), (243, 253))
    """
    band = icl_band(n_ctx)

    def positions(k: int) -> tuple[int, int]:
        return max(2, k - band) - 2, min(n_ctx, k + band) - 2

    early, late = icl_indices(n_ctx)
    return positions(early), positions(late)


def attention_by_band(model, windows: torch.Tensor) -> pd.DataFrame:
    """Per layer, at the query positions that predict the ICL score's early and late bands of tokens
    (``transient_bands`` of windows (n, n_ctx)): mean attention entropy, uniform attention's entropy there,
    and attention on the previous token."""
    (e_lo, e_hi), (l_lo, l_hi) = transient_bands(windows.shape[1])
    ent = attention_entropy(model, windows)
    ent = ent.assign(band=np.select([ent.position.between(e_lo, e_hi), ent.position.between(l_lo, l_hi)],
                                    ["early", "late"], "mid"))
    return (ent[ent.band != "mid"].groupby(["layer", "band"])
            .agg(entropy=("entropy", "mean"), uniform_entropy=("uniform_entropy", "mean"),
                 prev_token_attention=("prev_token_attention", "mean")).reset_index())


def transient_table(runs: dict[str, Path], checkpoints: pd.DataFrame, device: str, n: int = 64) -> pd.DataFrame:
    """At each model's checkpoints between 0.3M and 5M tokens: ``attention_by_band`` and the ICL score,
    to explain the early positive ICL score."""
    frames = []
    for name, run in runs.items():
        cfg = run_config(run)
        wins = eval_windows(cfg, n)
        ck = checkpoints[(checkpoints.model == name)]
        for c in list_checkpoints(run):
            step, tokens = step_tokens(c, cfg)
            if not 0.3e6 <= tokens <= 5e6:
                continue
            icl = ck[ck.step == step]
            frames.append(attention_by_band(load_model(c, device), wins.to(device)).assign(
                model=name, step=step, tokens=tokens, icl_score=float(icl.icl_score.iloc[0]) if len(icl) else math.nan))
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=["model", "step", "tokens", "layer", "band", "entropy"]))
