"""The main job: the whole default reproduction, then figures, a report and a machine-readable headline.

``python -m experiments reproduce`` (CPU, embedded corpus). Re-running resumes: trained models,
evaluated checkpoints and finished tables are skipped. The report (``report.md``, copied to
``figures/REPORT.md``) and ``headline.json`` (copied to ``figures/headline.json``) are written by the
same code (``headline``) from the result tables.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .common import ResultError, Results, check_writable, owns_results

ZOO_MODELS = ("attn-1l", "attn-2l", "smear-1l", "smear-2l")


# windows the ablations use per scale: the headline share on all of them, per-head sweeps on a half
# (pattern-preserving) or a quarter (zero, mean). cpu: 2,048, as the precise ICL points, for a share
# s.e. near 6% (1,024 gave 9%) at ~1 more minute.
ABLATION_WINDOWS = {"tiny": 64, "cpu": 2048, "gpu": 2048}


def reproduce(out: Path = Path("results/default"), scale: str = "cpu", device: str | None = None,
              progress: bool = True, figures_dir: Path | None = None, workers: int | None = None,
              seeds: int | None = None, corpus: str | None = None) -> Path:
    """The main job (module docstring). Bad input (scale, seeds, corpus, device, an unwritable ``out``, a
    damaged figures manifest, a run folder of other options) raises before anything is written, the results
    folder and its lock included."""
    from .figures import drawn_before
    from .zoo import SCALES, check_zoo_runs, zoo_configs

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
    device = device or ("cuda" if scale == "gpu" else "cpu")
    for cfg in zoo_configs(scale, device, seeds, corpus).values():  # seeds, corpus (path), device
        cfg.validate()
    check_writable(out)
    drawn_before(default_figures_dir(Path(out), scale, figures_dir))
    check_zoo_runs(scale, Path(out) / "runs", device, seeds, corpus)  # a run of other options (another scale)
    return _reproduce(Path(out), scale, device, progress, figures_dir, workers, seeds, corpus)


def default_figures_dir(out: Path, scale: str, figures_dir: Path | None) -> Path:
    """Where ``reproduce`` draws: ``figures_dir``, else figures/ at cpu scale, else ``out``/figures."""
    return Path(figures_dir) if figures_dir else (Path("figures") if scale == "cpu" else out / "figures")


@owns_results("out")
def _reproduce(out: Path, scale: str, device: str, progress: bool, figures_dir: Path | None, workers: int | None,
               seeds: int | None, corpus: str | None) -> Path:
    from .ablations import run_ablations
    from .circuit import run_circuit
    from .figures import make_figures
    from .phase_change import run_phase_change
    from .survey import run_survey
    from .zoo import scale_seeds, train_zoo

    figures_dir = default_figures_dir(out, scale, figures_dir)
    clock = _Clock(out, {"scale": scale, "seeds": len(scale_seeds(scale, seeds)), "corpus": corpus})
    from interventions.zoo.provenance import provenance

    git_at_start = provenance(config={})["git"]  # before the run rewrites figures/ (tracked files)
    runs = train_zoo(scale, out / "runs", device=device, progress=progress, workers=workers, seeds=seeds,
                     corpus=corpus)
    clock.stage("train_s")
    n_windows = {"tiny": 32, "cpu": 256, "gpu": 256}[scale]
    n_precise = {"tiny": 64, "cpu": 2048, "gpu": 2048}[scale]
    pc = run_phase_change(runs, out, n_windows=n_windows, device=device, progress=progress, workers=workers,
                          n_precise=n_precise, n_pca_pairs={"tiny": 256, "cpu": 2048, "gpu": 2048}[scale])
    clock.stage("phase_change_s")
    windows = pc.read("windows")
    for name in ablated_runs(runs, scale):
        run_ablations(runs[name], name, None, out, windows_table=windows,
                      n_windows=ABLATION_WINDOWS[scale], device=device, progress=progress)
    clock.stage("ablations_s")
    main_2l = _main_2l(runs)
    if main_2l:
        run_circuit(runs[main_2l], main_2l, pc.read("head_scores"), out, device=device)
    run_survey({name: str(run) for name, run in runs.items()}, out, device=device)
    timings = clock.finish()
    paths = make_figures(out, figures_dir)
    report = write_report(out, scale, timings, figures_dir, git=git_at_start)
    print(report.read_text())
    print(f"figures: {len(paths)} files in {figures_dir}")
    return report


def ablated_runs(names, scale: str) -> list[str]:
    """The runs ``reproduce`` ablates: on the CPU only attn-2l (every seed), the headline's model (the main job
    within 15 min); at the other scales also smear-1l (seed 0)."""
    return [n for n in names if _family(n) == "attn-2l" or (scale != "cpu" and n in ("smear-1l", "smear-1l-s0"))]


def missing_experiments(out: Path, names, scale: str) -> list[str]:
    """The experiment folders a complete ``reproduce`` of the runs ``names`` writes that ``out`` lacks (e.g.
    left behind when the tables were copied back from another machine): their report sections would be
    silently missing."""
    main_2l = _main_2l(names)
    wanted = [f"ablations_{n}" for n in ablated_runs(names, scale)] + ([f"circuit_{main_2l}"] if main_2l else [])
    return [f for f in wanted + ["survey"] if not (Path(out) / f / "manifest.json").is_file()]


def redraw(out: Path, scale: str | None, figures_dir: Path, git: dict | None = None) -> Path:
    """Figures, report and headline again from the result tables of ``out`` (e.g. tables copied back from
    a GPU machine whose call ended while drawing), the windows and PCA turns derived again by this code
    (``derive_windows``). ``scale``: the one the tables were made at (None: read off them,
    ``tables_scales``; one they contradict is refused). Timings: the sum of the invocations ``out``
    recorded with the options of the last (``same_job``); machine: the one that evaluated the checkpoints; ``git``: the commit the tables were made
    with (default: the phase change's provenance). Bad input raises before anything is written."""
    from .common import InputError, made_from_another_run, verify_tables
    from .figures import RUN_TABLES, attribution_at_other_windows, drawn_before, make_figures
    from .phase_change import derive_windows

    out = Path(out)
    runs = Results(out, "report").read_json("timings", default=[])  # first: a partial folder lacks tables
    if not any(r.get("complete", True) for r in runs):  # the tables of an unfinished run lack sections
        raise InputError(f"{out} has no recorded invocation that ran to completion (report/timings.json): run "
                         f"`reproduce --out {shlex.quote(str(out))}` to completion instead (it resumes)")
    # the last invocation that got past training (and so may have written tables) must have finished: one
    # killed mid-evaluation or mid-ablation left partial tables even when an earlier one completed
    last = next(r for r in reversed(runs) if r.get("complete", True) or "train_s" in r)
    if not last.get("complete", True):
        raise InputError(f"the last invocation that wrote tables under {out} was interrupted (report/timings.json): "
                         f"its tables may be partial; run `reproduce --out {shlex.quote(str(out))}` with its options to "
                         "completion instead (it resumes)")
    timings = sum_timings(same_job(runs, last.get("job")))  # the invocations that made these tables
    checkpoints = Results(out, "phase_change").read("checkpoints")
    fits = tables_scales(checkpoints)
    if scale is None and len(fits) != 1:
        raise InputError(f"the tables under {out} match no one scale's models and tokens: pass --scale")
    if scale is not None and fits and scale not in fits:
        raise InputError(f"the tables under {out} were made at scale {' or '.join(fits)}, not {scale}: pass "
                         f"--scale {fits[0]} or leave --scale out")
    scale = scale or fits[0]
    if git is None:
        git = evaluated_by(Results(out, "phase_change"))["git"]
    verify_tables(out)  # a damaged table is refused before the windows, figures or report are rewritten
    drawn_before(Path(figures_dir))  # and so is a damaged figures manifest
    missing = missing_experiments(out, checkpoints.model.unique(), scale)
    if missing:  # the report would leave their sections out without a word
        raise InputError(f"{out} lacks the results of {', '.join(missing)}, which `reproduce` writes: copy them "
                         f"back too, or run `reproduce --out {shlex.quote(str(out))}` with its options (it computes "
                         "only what is missing)")
    for model in checkpoints.model.unique():  # an experiment of another
        for prefix, tables in RUN_TABLES.items():  # state of a run would be reported as of this one
            if made_from_another_run(out, f"{prefix}_{model}", model, tables):
                raise ResultError(f"{out}/{prefix}_{model} was computed from another state of run {model} than "
                                  f"the phase-change tables: run `{prefix}` on {model} again (or `reproduce`), or "
                                  f"delete {out}/{prefix}_{model}")
    win = derive_windows(Results(out, "phase_change"))  # windows and PCA turns by this code's rules
    for r in win.itertuples():  # an attribution made at other windows would be drawn under these
        if attribution_at_other_windows(out, r.model):
            raise ResultError(f"{out}/ablations_{r.model}/attribution.csv was made at other ICL windows than "
                              f"these: run `ablations` on {r.model} again (or `reproduce`)")
    make_figures(out, Path(figures_dir))
    return write_report(out, scale, timings, Path(figures_dir), git=git)


def tables_scales(checkpoints: pd.DataFrame) -> list[str]:
    """The scales (``SCALES``) a phase change's checkpoints table fits: the same models, each run's last
    checkpoint within 5% of the scale's tokens for it (seeds and corpus aside)."""
    from .zoo import SCALES

    last = checkpoints.groupby("model").tokens.max()
    fams = {m: _family(m) for m in last.index}
    return [s for s, tokens in SCALES.items() if set(fams.values()) == set(tokens)
            and all(abs(last[m] - tokens[f]) <= 0.05 * tokens[f] for m, f in fams.items())]


def _family(name: str) -> str:
    """The model of a run name: ``attn-2l-s1`` -> ``attn-2l`` (runs of one seed have no suffix)."""
    from .zoo import split_run_name

    return split_run_name(name)[0]


def _main_2l(names) -> str | None:
    """The attn-2l run the single-run headlines (ablation, circuit) use: ``attn-2l``, else seed 0's."""
    names = list(names)
    return "attn-2l" if "attn-2l" in names else next((n for n in sorted(names) if _family(n) == "attn-2l"), None)


TIMED = ("train_s", "phase_change_s", "ablations_s", "total_s")


class _Clock:
    """This invocation's entry in ``report/timings.json``, rewritten after every stage: an invocation
    killed mid-way keeps the stages it finished (``complete`` false), so the report can say so."""

    def __init__(self, out: Path, job: dict | None = None):
        self.res, self.t0 = Results(out, "report"), time.time()
        self.earlier = self.res.read_json("timings", default=[])
        self.entry: dict = {"complete": False, "total_s": 0.0, "job": job}  # job: the options the tables depend on
        self._write()

    def _write(self) -> None:
        self.res.write_json("timings", self.earlier + [self.entry])

    def stage(self, name: str) -> None:
        """Record the seconds since the previous stage as ``name`` (and the total so far)."""
        done = sum(self.entry.get(k, 0.0) for k in TIMED[:-1])
        self.entry |= {name: time.time() - self.t0 - done, "total_s": time.time() - self.t0}
        self._write()

    def finish(self) -> dict:
        """Close this invocation's entry; the times summed over every invocation (``sum_timings``)."""
        self.entry |= {"total_s": time.time() - self.t0, "complete": True}
        self._write()
        return sum_timings(same_job(self.earlier, self.entry["job"]) + [self.entry])


def same_job(runs: list[dict], job: dict | None) -> list[dict]:
    """The invocations of ``job`` (scale, seeds, corpus): one made with other options into the same folder
    trained and evaluated other runs, not part of these tables' time (entries without a job predate it)."""
    return [r for r in runs if r.get("job", job) == job]


def sum_timings(runs: list[dict]) -> dict:
    """Seconds per stage summed over invocations, their number, and how many were interrupted (counted
    up to their last finished stage; entries without ``complete`` predate the flag and were complete).

    >>> sum_timings([{"train_s": 60.0, "total_s": 60.0, "complete": False}, {"train_s": 1.0, "total_s": 9.0}])
    {'train_s': 61.0, 'phase_change_s': 0.0, 'ablations_s': 0.0, 'total_s': 69.0, 'invocations': 2, 'interrupted': 1}
    """
    return ({k: sum(r.get(k, 0.0) for r in runs) for k in TIMED}
            | {"invocations": len(runs), "interrupted": sum(not r.get("complete", True) for r in runs)})


def _f(x) -> float | None:
    """A float for JSON (None for NaN/missing)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def headline(out: Path, timings: dict | None = None, git: dict | None = None) -> dict:
    """The report's numbers, from the result tables (``figures/headline.json``). ``git``: the commit
    and dirty flag taken when the run started (default: now)."""
    from interventions.zoo.provenance import provenance

    pc = Results(out, "phase_change")
    ck, win, prec = pc.read("checkpoints"), pc.read("windows"), pc.read("icl_precise")  # checksums verified
    turn = pc.read_optional("pca_turn")  # None: the PCA was left out of these tables
    prov = provenance(config={}, timings=timings or {})
    pc_prov = pc.read_provenance() or {}  # checksum verified
    m = evaluated_by(pc).get("machine") or prov["machine"]  # the machine that evaluated the checkpoints
    h: dict = {"machine": f"{m['platform']}, {m['threads']} threads, GPU: {m['cuda'] or 'none'}",
               "git_commit": (git or prov["git"])["commit"], "git_dirty": (git or prov["git"])["dirty"]}
    made: dict = {}  # (commit, machine) of each invocation that computed tables here -> their folders
    for manifest in sorted(out.glob("*/manifest.json")):
        if manifest.parent.name != "report":
            for inv in Results(out, manifest.parent.name).made_by():
                mm = inv.get("machine") or {}
                key = ((inv.get("git") or {}).get("commit"),
                       f"{mm.get('platform')}, {mm.get('threads')} threads, GPU: {mm.get('cuda') or 'none'}")
                made.setdefault(key, []).append(manifest.parent.name)
    h["tables_made_by"] = [{"git_commit": c, "machine": mach, "folders": sorted(set(f))} for (c, mach), f in made.items()]
    if timings:
        h |= {"wall_clock_min": timings["total_s"] / 60, "train_min": timings["train_s"] / 60,
              "invocations": timings.get("invocations", 1), "invocations_interrupted": timings.get("interrupted", 0)}
    settings = pc_prov.get("config", {})
    h["evaluation"] = {  # window counts as the tables hold them
        "windows_per_checkpoint": int(ck.icl_n.max()) if "icl_n" in ck and len(ck) else settings.get("n_windows"),
        "windows_precise": int(prec.n.max()) if "n" in prec and len(prec) else settings.get("n_precise"),
        "pca_pairs": settings.get("n_pca_pairs")}
    lbi = pc.read_optional("loss_by_index")
    n_ctx = int(lbi.token_index.max()) + 1 if lbi is not None and len(lbi) else None  # indices 1..n_ctx-1
    h["icl_definition"] = icl_definition(n_ctx)
    if n_ctx is not None:
        h["icl_positions"] = icl_positions(n_ctx)
    models = {}
    for r in win.itertuples():
        # "ends inside" and "plateaued" are None where there is no window / no plateau test (not False: a
        # false would say "ends outside" / "still moving", and the seed spread would count it so)
        icl_win, ind_win = _f(r.icl_window_start_tokens) is not None, _f(r.induction_window_start_tokens) is not None
        d = {"run_tokens": int(r.run_tokens),
             "icl_window_start_tokens": _f(r.icl_window_start_tokens), "icl_window_end_tokens": _f(r.icl_window_end_tokens),
             "icl_window_fitted_fall": _fit_size(r, "icl"),  # nats, window or not
             "icl_window_p_value": _f(getattr(r, "icl_window_p_value", None)),  # the fall's F-test (rise_window)
             "icl_window_ends_inside": bool(r.icl_window_ends_inside) if icl_win else None,
             "icl_window_width_ratio": _f(r.icl_window_end_tokens / r.icl_window_start_tokens),
             "icl_window_end_fraction_of_run": _f(r.icl_window_end_tokens / r.run_tokens),
             "checkpoints_in_window": int(r.icl_window_n_checkpoints),
             "induction_window_start_tokens": _f(r.induction_window_start_tokens),
             "induction_window_end_tokens": _f(r.induction_window_end_tokens),
             "checkpoints_in_induction_window": int(r.induction_window_n_checkpoints),
             "induction_window_fitted_rise": _fit_size(r, "induction"),
             "induction_window_p_value": _f(getattr(r, "induction_window_p_value", None)),
             "induction_window_ends_inside": bool(r.induction_window_ends_inside) if ind_win else None,
             "induction_window_end_fraction_of_run": _f(r.induction_window_end_tokens / r.run_tokens),
             "final_induction_score": _f(r.final_induction_score), "final_icl": _f(r.final_icl),
             "final_icl_sem": _f(r.final_icl_sem),
             "bump": bool(r.bump), "bump_start_tokens": _f(r.bump_start_tokens), "bump_end_tokens": _f(r.bump_end_tokens),
             "icl_plateau_change_last_20pct": _f(r.plateau_change), "icl_plateau_change_sem": _f(r.plateau_sem),
             "icl_plateaued": bool(r.plateaued) if _f(r.plateau_sem) is not None else None}
        p = prec[prec.model == r.model].set_index("point")
        for point, key in (("before", "icl_before"), ("after", "icl_after"), ("final", "icl_final"),
                           ("after_minus_before", "icl_drop"), ("attn1l_at_before", "icl_at_attn2l_before"),
                           ("before_minus_attn1l", "icl_before_minus_attn1l")):
            if point in p.index:
                d[key], d[f"{key}_sem"] = _f(p.loc[point, "icl_score"]), _f(p.loc[point, "icl_sem"])
                if p.loc[point, "tokens"] >= 0:
                    d[f"{key}_tokens"] = int(p.loc[point, "tokens"])
        models[r.model] = d
    h["models"] = models
    h |= {name: models[name] for name in ZOO_MODELS if name in models}  # flat keys for the main four
    h["pca_turn_deg"] = {r.model: _f(r.turn_deg) for r in turn.itertuples()} if turn is not None else {}
    main_2l = _main_2l(models)
    if main_2l and (summary := ablation_summary(out, main_2l)) is not None:
        h["ablation"] = summary | {"model": main_2l}
    by_seed = {n: ablation_summary(out, n) for n in models if _family(n) == "attn-2l" and n != "attn-2l"}
    by_seed = {n: v for n, v in by_seed.items() if v is not None}
    if len(by_seed) > 1:
        h["ablation_by_seed"] = by_seed
    pp = Results(out, f"circuit_{main_2l}").read_optional("path_patch") if main_2l else None
    if pp is not None and len(pp):
        h["path_patching"] = path_patching_summary(pp)
    h["smear_vs_vanilla"] = smear_vs_vanilla(ck, pc.read("head_scores"), prec)
    tr = pc.read("transient")
    if len(tr):
        h["transient"] = transient_summary(tr, ck)
    spread = seed_spread(models, h["pca_turn_deg"], h.get("ablation_by_seed", {}))
    if spread:
        h["seed_spread"] = spread
    return h


def evaluated_by(pc: Results) -> dict:
    """The invocation (``provenance.json``'s, with its git and machine) that evaluated the checkpoints of the
    phase-change tables ``pc``: the one that wrote the per-run ``checkpoints_<run>`` tables, the earliest where
    several did (the report's note names the others). Not the record's first invocation as such: one stopped
    before it evaluated anything, at another commit or on another machine, made none of these tables."""
    prov = pc.read_provenance() or {}
    inv = prov.get("invocations") or [prov]
    made = sorted({pc.invocation_of(t) or 0 for t in pc.tables() if t.startswith("checkpoints_")})
    return inv[made[0]] if made and made[0] < len(inv) else prov


def _fit_size(r, which: str) -> float | None:
    """The fitted size of the logistic part of a windows row's ``which`` ("icl": fall, "induction": rise)
    fit, or None where no fit was made (fewer than 5 checkpoints to fit: no fit rms) or the tables lack it."""
    if _f(getattr(r, f"{which}_window_fit_rms", None)) is None:
        return None
    return _f(getattr(r, f"{which}_window_rise", None))


def icl_positions(n_ctx: int) -> dict:
    """The ICL score's early and late token and band half-width at context ``n_ctx`` (``icl_indices``,
    ``icl_band``), and the query positions the transient's "early" / "late" attention bands cover
    ([first, last], 0-based: those predicting the ICL score's bands, ``transient_bands``)."""
    from interventions.analysis.metrics import icl_band, icl_indices

    from .phase_change import transient_bands

    early, late = icl_indices(n_ctx)
    e, l_ = transient_bands(n_ctx)
    return {"n_ctx": n_ctx, "early": early, "late": late, "band": icl_band(n_ctx),
            "transient_early": list(e), "transient_late": list(l_)}


def icl_definition(n_ctx: int | None) -> str:
    """The report's sentence defining the ICL score, with the token numbers of context ``n_ctx`` (None:
    no loss-by-index table to read the context from; the rule instead of the numbers).

        >>> icl_definition(256).split("(")[1].split(")")[0]
        'early, late = 25, 250 of 256; b = 5'
    """
    if n_ctx is None:
        where = "early, late = the paper's 50th and 500th of 512 tokens scaled to the context; b = 10/512 of it"
    else:
        p = icl_positions(n_ctx)
        where = f"early, late = {p['early']}, {p['late']} of {n_ctx}; b = {p['band']}"
    return ("mean loss of tokens late-b..late+b minus early-b..early+b per window, averaged over windows "
            f"({where}); s.e. = std of the per-window difference / sqrt(windows)")


def seed_spread(models: dict, pca_turn: dict | None = None, ablation: dict | None = None) -> dict:
    """Across the seeds of each model (runs ``<model>-s<k>``, at least two): every numeric headline number
    as mean, s.d. (n - 1), min, max and n over the seeds that have it, and, for true/false numbers, how
    many seeds are true. ``pca_turn``: degrees per run; ``ablation``: the attn-2l ablation summaries by run.

        >>> seed_spread({"m-s0": {"x": 1.0, "ok": True}, "m-s1": {"x": 3.0, "ok": False}})["m"]["x"]
        {'mean': 2.0, 'sd': 1.4142135623730951, 'min': 1.0, 'max': 3.0, 'n': 2}
    """
    per_run = {name: dict(d) for name, d in models.items()}
    for name, deg in (pca_turn or {}).items():
        per_run.setdefault(name, {})["pca_turn_deg"] = deg
    for name, a in (ablation or {}).items():
        per_run.setdefault(name, {}).update({f"ablation_{k}": v for k, v in a.items()})
    from .zoo import split_run_name

    families: dict[str, list[dict]] = {}
    for name, d in per_run.items():
        model, seed = split_run_name(name)
        if seed is not None:
            families.setdefault(model, []).append(d)
    out = {}
    for family, runs in families.items():
        if len(runs) < 2:
            continue
        row = {"seeds": len(runs)}
        for key in sorted({k for d in runs for k in d}):
            vals = [d.get(key) for d in runs]
            if all(isinstance(v, bool) for v in vals if v is not None) and any(isinstance(v, bool) for v in vals):
                row[key] = {"true": sum(bool(v) for v in vals), "n": sum(v is not None for v in vals)}
                continue
            nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(float(v))]
            if nums:
                row[key] = {"mean": float(np.mean(nums)), "sd": float(np.std(nums, ddof=1)) if len(nums) > 1 else None,
                            "min": min(nums), "max": max(nums), "n": len(nums)}
        out[family] = row
    return out


def ablation_summary(out: Path, name: str) -> dict | None:
    """The ablation headline of run ``name`` (its ``ablations_<name>`` tables), or None when not run."""
    abl = Results(out, f"ablations_{name}")
    sets = abl.read_optional("sets")  # never written: None; damaged: ResultError, never skipped
    if sets is None:
        return None
    per = abl.read("per_head")
    pat = per[per.kind == "pattern"]
    n_windows = (abl.settings() or {}).get("n_windows")  # the sets' windows; the per-head sweep's are the first half
    ind = sets[sets.group == "induction heads"]
    others = pat[~pat.is_induction]
    rnd = sets[sets.group == "random (non-induction)"]
    allo = sets[sets.group == "all other heads"]
    heads = ind.heads.iloc[0].split() if len(ind) and isinstance(ind.heads.iloc[0], str) else []
    size = len(heads)
    return {
        "kind": "pattern-preserving zero ablation, final attn-2l checkpoint",
        "induction_heads": heads,
        "icl_clean": _f(sets[sets.group == "clean"].icl_score.iloc[0]),
        "icl_clean_sem": _f(sets[sets.group == "clean"].icl_sem.iloc[0]),
        "icl_share_removed": _f(ind.icl_share_removed.iloc[0]) if len(ind) else None,
        "icl_share_removed_sem": _f(ind.icl_share_removed_sem.iloc[0]) if len(ind) else None,
        "icl_change_nats": _f(ind.icl_change.iloc[0]) if len(ind) else None,
        "other_heads_single_share_min": _f(others.icl_share.min()),
        "other_heads_single_share_max": _f(others.icl_share.max()),
        "other_heads_single_share_sem_max": _f(others.icl_share_sem.max()) if "icl_share_sem" in others else None,
        "other_heads_single_larger_icl": int((others.icl_share < 0).sum()), "other_heads_n": int(len(others)),
        "windows": n_windows, "other_heads_single_windows": None if n_windows is None else n_windows // 2,
        "random_control_share": _f(rnd.icl_share_removed.mean()) if len(rnd) else None,
        "random_control_share_sem": _f(rnd.icl_share_removed.std(ddof=1) / math.sqrt(len(rnd))) if len(rnd) > 1 else None,
        "random_control_draws": int(len(rnd)), "random_control_distinct_sets": int(rnd.heads.nunique()),
        # the sets' size and how many there are (``random_head_sets``: every one of them when <= n_random)
        "random_control_set_size": size if len(rnd) else None,
        "random_control_possible_sets": math.comb(len(others), size) if len(rnd) else None,
        "all_other_heads_icl_change_nats": _f(allo.icl_change.iloc[0]) if len(allo) else None,
        "all_other_heads_icl_change_sem": _f(allo.icl_change_sem.iloc[0]) if len(allo) else None,
    }


def path_patching_summary(pp: pd.DataFrame) -> dict:
    """The previous-token head -> induction head path through each receiver input (effect, s.e., share
    of the induction benefit), and the largest |effect| of any other sender -> receiver pair."""
    key = pp[pp.sender_is_previous_token.astype(bool) & pp.receiver_is_induction.astype(bool)]
    if key.empty:
        return {}
    r0 = key.iloc[0]
    out = {"model": str(r0.model), "sender": str(r0.sender), "receiver": str(r0.receiver),
           "n_prompts": int(r0.n_prompts), "clean_loss": _f(r0.clean_loss), "unrepeated_loss": _f(r0.unrepeated_loss),
           "method": "clean run; the sender's output on the path resampled from another repeated random-token prompt"}
    for kind in ("q", "k", "v"):
        r = key[key.receiver_input == kind].iloc[0]
        others = pp[(pp.receiver_input == kind) & ~((pp.sender == r.sender) & (pp.receiver == r.receiver))]
        out[kind] = {"effect": _f(r.effect), "se": _f(r.se), "share": _f(r.share),
                     "other_pairs_max_abs_effect": _f(others.effect.abs().max()) if len(others) else None}
    return out


def smear_vs_vanilla(ck: pd.DataFrame, hs: pd.DataFrame, precise: pd.DataFrame | None = None) -> dict:
    """Each smeared model against its vanilla twin at the largest token count both were checkpointed
    at (one schedule: constant lr after the same warm-up, so a prefix of the longer run is comparable).

    With the ``icl_precise`` table's ``smear_compare`` / ``smear_minus_vanilla`` rows at that token count,
    the ICL scores are those (more windows) and the difference's s.e. is paired over the windows
    (``icl_difference_paired``); else the checkpoints table's scores with the unpaired s.e."""
    from .zoo import smear_twins, split_run_name

    ind = hs[hs.score == "induction"].groupby(["model", "tokens"]).value.max()
    out = {}
    # each vanilla run with its smeared twin of the same seed (runs ``<model>-s<k>``: one pair per seed)
    for a, b in sorted(smear_twins(ck.model), key=lambda p: (split_run_name(p[0])[1] or 0, p[0])):
        common = sorted(set(ck[ck.model == a].tokens) & set(ck[ck.model == b].tokens))
        if not common:
            continue
        t = int(common[-1])
        row = {"tokens": t}
        at = (precise[(precise.tokens == t) & (precise.point.isin(["smear_compare", "smear_minus_vanilla"]))]
              if precise is not None else pd.DataFrame(columns=["model", "point"]))
        got = {(r.model, r.point): r for r in at.itertuples()}
        paired = all(k in got for k in ((a, "smear_compare"), (b, "smear_compare"), (b, "smear_minus_vanilla")))
        for m in (a, b):
            r = got[(m, "smear_compare")] if paired else ck[(ck.model == m) & (ck.tokens == t)].iloc[0]
            row[m] = {"icl_score": _f(r.icl_score), "icl_sem": _f(r.icl_sem), "induction_score": _f(ind.get((m, t)))}
        sa, sb = row[a]["icl_sem"], row[b]["icl_sem"]
        # unpaired: as if the two scores came from different windows (larger than the paired s.e. when
        # windows that favour context do so in both models)
        row["icl_difference_sem_unpaired"] = _f(math.hypot(sa, sb)) if sa is not None and sb is not None else None
        row["icl_difference_paired"] = paired
        if paired:
            d = got[(b, "smear_minus_vanilla")]
            row["icl_difference"], row["icl_difference_sem"] = _f(d.icl_score), _f(d.icl_sem)
            row["n_windows"] = int(d.n)
        else:
            row["icl_difference"] = _f(row[b]["icl_score"] - row[a]["icl_score"])
            row["icl_difference_sem"] = row["icl_difference_sem_unpaired"]
        out[f"{b}_vs_{a}"] = row
    return out


def transient_summary(tr: pd.DataFrame, ck: pd.DataFrame | None = None) -> dict:
    """Per model, at the checkpoint (0.3-5M tokens) with the highest ICL score: attention entropy of
    late vs early query positions, as a fraction of uniform attention's entropy; with the checkpoints
    table ``ck``, also that ICL score's s.e. (``icl_sem``) and how many checkpoints it is the highest of
    (``checkpoints``: the highest of several noisy scores overstates the transient)."""
    out = {}
    for model, d in tr.groupby("model", sort=False):
        step = d.loc[d.icl_score.idxmax(), "step"]
        e = d[d.step == step].groupby("band")[["entropy", "uniform_entropy", "prev_token_attention"]].mean()
        l0 = d[(d.step == step) & (d.layer == 0)].groupby("band").prev_token_attention.mean()
        at = ck[(ck.model == model) & (ck.step == step)] if ck is not None else ()
        out[model] = {"tokens": int(d[d.step == step].tokens.iloc[0]), "icl_score": _f(d.icl_score.max()),
                      "icl_sem": _f(at.icl_sem.iloc[0]) if len(at) else None, "checkpoints": int(d.step.nunique()),
                      **{f"entropy_{b}": _f(e.loc[b, "entropy"]) for b in e.index},
                      **{f"entropy_fraction_of_uniform_{b}": _f(e.loc[b, "entropy"] / e.loc[b, "uniform_entropy"])
                         for b in e.index},
                      **{f"layer0_prev_token_attention_{b}": _f(l0.loc[b]) for b in l0.index}}
    return out


SPREAD_KEYS = (  # (key, label, format): the report's seed-spread table; every key is in headline.json
    ("icl_window_start_tokens", "ICL window start", "tok"), ("icl_window_end_tokens", "ICL window end", "tok"),
    ("icl_window_width_ratio", "ICL window width (x)", ".2f"), ("checkpoints_in_window", "checkpoints in it", ".1f"),
    ("icl_window_ends_inside", "window ends inside the run", "count"),
    ("induction_window_start_tokens", "induction window start", "tok"),
    ("final_induction_score", "final induction score", ".2f"), ("icl_before", "ICL before (nats)", "+.3f"),
    ("icl_after", "ICL after (nats)", "+.3f"), ("icl_drop", "ICL change across (nats)", "+.3f"),
    ("icl_final", "final ICL (nats)", "+.3f"), ("icl_plateaued", "ICL plateaued", "count"),
    ("pca_turn_deg", "PCA turn (deg)", ".0f"), ("bump", "bump detector fires", "count"),
    ("ablation_icl_share_removed", "induction heads remove (share)", ".0%"),
    ("ablation_random_control_share", "random control removes (share)", ".0%"))


def spread_lines(spread: dict) -> list[str]:
    """The report's table of the seed spread: mean ± s.d. (min to max) per model, n seeds."""
    def cell(v, fmt):
        if v is None:
            return ""
        if fmt == "count":
            return f"{v['true']} of {v['n']}"
        f = _tok if fmt == "tok" else (lambda x: format(x, fmt))
        sd = "" if v["sd"] is None else f" ± {f(v['sd']).lstrip('+')}"
        return f"{f(v['mean'])}{sd} ({f(v['min'])} to {f(v['max'])}, n={v['n']})"

    fams = list(spread)
    lines = ["## Spread across seeds", "",
             "Seeds per model: " + ", ".join(f"{f} {spread[f]['seeds']}" for f in fams) + "; mean ± s.d. over seeds (min to max, n = seeds where the number exists). The s.d. is the "
             "seed-to-seed spread, not a standard error of one run.", "",
             "| | " + " | ".join(fams) + " |", "|---" * (len(fams) + 1) + "|"]
    for key, label, fmt in SPREAD_KEYS:
        cells = [cell(spread[f].get(key), fmt) for f in fams]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _count(n) -> str:
    return "?" if n is None else f"{n:,}"


def _tok(x) -> str:
    return f"{x / 1e6:.1f}M" if x is not None and np.isfinite(x) else "n/a"


def _fitted(v, what: str, unit: str, sep: str = "; ") -> str:
    """``what`` and the fitted size of a window's logistic part (``rise_window``'s rise), or "" when the
    tables do not hold it.

        >>> _fitted(0.203, "fall", " nats"), _fitted(None, "fall", " nats")
        ('fall 0.20 nats; ', '')
    """
    return "" if v is None else f"{what} {v:.2f}{unit}{sep}"


def random_control_sets(a: dict) -> str:
    """What the random control of an ablation headline ablated: how many distinct sets, of how many heads, out
    of how many possible (``random_head_sets``); a headline without the sets' size, its draws.

        >>> random_control_sets({"random_control_draws": 6, "random_control_set_size": 1,
        ...                      "random_control_possible_sets": 7, "other_heads_n": 7})
        '6 distinct single heads from the 7 non-induction heads (seeded draws without repeats, of 7 possible)'
        >>> random_control_sets({"random_control_draws": 1, "random_control_set_size": 2,
        ...                      "random_control_possible_sets": 1, "other_heads_n": 2})
        '1 distinct set of 2 heads from the 2 non-induction heads (every possible one)'
    """
    n, size, possible = (a.get(k) for k in ("random_control_draws", "random_control_set_size",
                                             "random_control_possible_sets"))
    if size is None or possible is None:
        return (f"{n} draws of a set of the same size from the non-induction heads "
                f"({a.get('random_control_distinct_sets', '?')} distinct)")
    what = (f"single head{'s' * (n != 1)}" if size == 1 else f"set{'s' * (n != 1)} of {size} heads")
    how = "every possible one" if n == possible else f"seeded draws without repeats, of {possible:,} possible"
    return f"{n} distinct {what} from the {a.get('other_heads_n', '?')} non-induction heads ({how})"


def _pval(p) -> str:
    """", p = <p>" of a window's F-test (``rise_window``'s ``p_value``), or "" when the tables do not hold it.

        >>> _pval(0.0039), _pval(3e-5), _pval(1e-31), _pval(None), _pval(float("nan"))
        (', p = 0.0039', ', p = 3e-05', ', p < 1e-16', '', '')
    """
    p = _f(p)
    return "" if p is None else f", p = {p:.2g}" if p >= 1e-16 else ", p < 1e-16"


def _nan(v) -> float:
    """A headline number for formatting: None (NaN in the tables, e.g. a share without clean ICL) as NaN."""
    return math.nan if v is None else v


def _pm(v, s, unit=" nats") -> str:
    return "n/a" if v is None else f"{v:+.3f} ± {s:.3f}{unit}" if s is not None else f"{v:+.3f}{unit}"


def _made_by_note(h: dict) -> str:
    """A sentence naming the invocations that computed the tables, when they are not just this commit on
    this machine (a rerun that skipped finished tables, or tables made by several invocations)."""
    made = h.get("tables_made_by") or []
    if all(m["git_commit"] == h["git_commit"] and m["machine"] == h["machine"] for m in made):
        return ""
    return " Tables computed by " + "; ".join(
        f"commit {str(m['git_commit'])[:7]} on {m['machine']} ({', '.join(m['folders'])})" for m in made) + "."


def phase_change_lines(h: dict) -> list[str]:
    """The report's lines on each model's windows, ICL points, plateau and bump, from a ``headline``
    (also what ``phase-change`` prints)."""
    from .phase_change import FIT_FROM_TOKENS, MIN_ICL_DROP, MIN_INDUCTION_RISE, WINDOW_P

    lines: list[str] = []
    for name, d in h["models"].items():
        fall, rise = d.get("icl_window_fitted_fall"), d.get("induction_window_fitted_rise")
        p_icl, p_ind = _pval(d.get("icl_window_p_value")), _pval(d.get("induction_window_p_value"))
        w = (f"ICL window {_tok(d['icl_window_start_tokens'])} - {_tok(d['icl_window_end_tokens'])} tokens "
             f"({_fitted(fall, 'fall', ' nats' + p_icl)}{d['icl_window_width_ratio']:.2f}x wide, ends at "
             f"{100 * d['icl_window_end_fraction_of_run']:.0f}% of the "
             f"run, {'inside' if d['icl_window_ends_inside'] else 'NOT inside'} it, {d['checkpoints_in_window']} "
             f"checkpoints inside)" if d["icl_window_start_tokens"] else f"no ICL window (the logistic fit to the "
             f"checkpoints from {_tok(FIT_FROM_TOKENS)} tokens on, at least 5, has no fall of the ICL score of at "
             f"least {MIN_ICL_DROP} nats, significant against the trend alone (F-test, p < {WINDOW_P}), whose 10% "
             f"point lies inside them{_fitted(fall, '; its fitted fall', ' nats' + p_icl, '')})")
        end = d.get("induction_window_end_fraction_of_run")
        iw = (f"induction window {_tok(d['induction_window_start_tokens'])} - {_tok(d['induction_window_end_tokens'])}"
              + (f" ({_fitted(rise, 'rise', p_ind)}ends at {100 * end:.0f}% of the run, "
                 f"{'inside' if d['induction_window_ends_inside'] else 'NOT inside'} it, "
                 f"{d['checkpoints_in_induction_window']} checkpoints inside)"
                 if end is not None and d.get("induction_window_ends_inside") is not None else "")
              if d["induction_window_start_tokens"] else "no induction window (likewise, no rise of the best induction "
              f"score of at least {MIN_INDUCTION_RISE}, significant at p < {WINDOW_P}"
              f"{_fitted(rise, '; its fitted rise', p_ind, '')})")
        lines += [f"- **{name}** ({_tok(d['run_tokens'])} tokens): {w}; {iw}; final best induction score "
                  f"{d['final_induction_score']:.2f}; final ICL {_pm(d['final_icl'], d['final_icl_sem'])} ({_count(h['evaluation']['windows_per_checkpoint'])} windows)."]
        if "icl_before" in d:
            lines += [f"  - ICL before the window {_pm(d['icl_before'], d['icl_before_sem'])} (at {_tok(d['icl_before_tokens'])}), "
                      f"after {_pm(d['icl_after'], d['icl_after_sem'])} (at {_tok(d['icl_after_tokens'])}); change across it "
                      f"{_pm(d['icl_drop'], d['icl_drop_sem'])} (paired, {_count(h['evaluation']['windows_precise'])} windows)."]
            one = h["models"].get(name.replace("attn-2l", "attn-1l"), {})
            if "icl_before_minus_attn1l" in d and "icl_at_attn2l_before" in one:
                lines += [f"  - The 1-layer control at its last checkpoint at or before {_tok(d['icl_before_tokens'])} "
                          f"({_tok(one['icl_at_attn2l_before_tokens'])}), same windows: ICL {_pm(one['icl_at_attn2l_before'], one['icl_at_attn2l_before_sem'])}; "
                          f"{name} minus it {_pm(d['icl_before_minus_attn1l'], d['icl_before_minus_attn1l_sem'])} "
                          "(paired): ICL score that the 2-layer model has before its window and the 1-layer "
                          "control, which forms no induction heads, lacks. It does not say what in the 2-layer "
                          "model carries it (the two points may also lie apart in tokens, as named)."]
        if d.get("icl_plateau_change_last_20pct") is not None:
            lines += [f"  - Plateau: the last 20% of the run moves the ICL score by "
                      f"{_pm(d['icl_plateau_change_last_20pct'], d['icl_plateau_change_sem'])} "
                      f"(paired, {_count(h['evaluation']['windows_precise'])} windows; "
                      f"{'< 2 s.e.: no change detected, called plateaued' if d['icl_plateaued'] else '>= 2 s.e.: still moving'})."]
        one_point = d["bump"] and d["bump_start_tokens"] == d["bump_end_tokens"]  # a "stretch" of one checkpoint
        lines += [f"  - Loss-bump detector: {'fires at ' + (_tok(d['bump_start_tokens']) + ' (one checkpoint)' if one_point else _tok(d['bump_start_tokens']) + ' - ' + _tok(d['bump_end_tokens'])) if d['bump'] else 'no non-convex stretch'}."]
    return lines


def write_report(out: Path, scale: str, timings: dict, figures_dir: Path, git: dict | None = None) -> Path:
    h = headline(out, timings, git)
    Results(out, "report").write_json("headline", h)
    lines = [f"# Reproduction report ({scale} scale)", "",
             f"Machine: {h['machine']}. Commit {h['git_commit']} (dirty: "
             f"{'unknown' if h['git_dirty'] is None else h['git_dirty']}). Wall-clock: "
             f"{timings['total_s'] / 60:.1f} min (training {timings['train_s'] / 60:.1f} min), over "
             f"{timings.get('invocations', 1)} invocation(s)"
             + (f", {timings['interrupted']} of them interrupted (counted up to their last finished stage)"
                if timings.get("interrupted") else "") + "." + _made_by_note(h), "",
             f"ICL score: {h['icl_definition']}. Negative = later tokens predicted better.", "",
             "## Phase change (Argument 1)", "",
             "Windows: where the logistic part of a least-squares fit (a logistic in log tokens on a linear trend) "
             "passes 10% and 90% of its fall (ICL score) or rise (best head's induction score); \"fall\" and "
             "\"rise\" below are that part's fitted size. One fit to one run's checkpoints: the windows carry no "
             "standard error (the seed spread, where several seeds were run, shows how far they move). A window "
             "ends inside the run when its 90% point lies at least half its own width (in log tokens) before "
             "the last checkpoint.", ""]
    lines += phase_change_lines(h)
    lines += ["", "The bump detector marks the most concave stretch of validation loss against log tokens after "
              "5% of the run. It fires on any model whose loss curve bends downwards anywhere (noise included), "
              "so a bump means something only where it coincides with the window; compare attn-1l's line.", ""]
    if h.get("pca_turn_deg"):
        pca = Results(out, "phase_change").read_optional("pca")
        sets = pca.pairs.nunique() if pca is not None and "pairs" in pca else 1
        lines += ["## Per-token-loss PCA", "",
                  f"{_count(h['evaluation']['pca_pairs'])} (example, token) pairs, one token from each of as many separate "
                  + ("windows, the same pairs for every run; PCs fit on every model's " if sets == 1 else
                     f"windows; the runs were evaluated on {sets} different sets of pairs (other corpora or contexts), "
                     "so each set has its own PCA fit (its own panel in the figure), on its models' ")
                  + "checkpoints after 1M tokens (warm-up), all checkpoints projected. Turn = angle between "
                  "the trajectory's direction over [start/2.5, start] and over [start, end] of attn-2l's ICL "
                  "window, in the PC1-PC2 plane (0 = straight on; one trajectory per run, so no standard error): "
                  + "; ".join(f"{m} {v:.0f}°" if v is not None else f"{m} n/a" for m, v in h["pca_turn_deg"].items())
                  + " (n/a: the run ends before the window does, or its PCA checkpoints do not resolve the window).", ""]
    elif not (Path(out) / "phase_change" / "pca_turn.csv").is_file():
        lines += ["## Per-token-loss PCA", "", "Not in these results (no `pca_turn` table).", ""]
    if "ablation" in h:
        a = h["ablation"]
        lines += ["## Which heads carry the ICL (Argument 3)", "",
                  f"Pattern-preserving zero ablation on the final {a.get('model', 'attn-2l')}, "
                  f"{a.get('windows') or ABLATION_WINDOWS[scale]:,} windows (single heads: the per-head sweep, on the "
                  f"first {a.get('other_heads_single_windows') or ABLATION_WINDOWS[scale] // 2:,}); clean ICL "
                  f"{_pm(a['icl_clean'], a['icl_clean_sem'])}. Share = (ICL_ablated - ICL_clean) / -ICL_clean, "
                  "bootstrap s.e. over windows.", "",
                  f"- Induction heads by `classify_induction_heads` ({', '.join(a['induction_heads']) or 'none'}): "
                  + (f"remove **{100 * a['icl_share_removed']:.0f}% ± {100 * _nan(a['icl_share_removed_sem']):.0f}%** of the ICL "
                     f"score ({_pm(a['icl_change_nats'], None)})." if a["icl_share_removed"] is not None else "n/a."),
                  f"- Each other head alone: shares from {100 * _nan(a['other_heads_single_share_min']):.0f}% to "
                  f"{100 * _nan(a['other_heads_single_share_max']):.0f}% (s.e. each at most "
                  f"{100 * (a.get('other_heads_single_share_sem_max') or float('nan')):.0f}%); {a['other_heads_single_larger_icl']} of "
                  f"{a['other_heads_n']} make the ICL score larger (negative share), the paper's observation.",
                  f"- Random control, {random_control_sets(a)}: mean share "
                  f"{100 * (a['random_control_share'] or float('nan')):.0f}%"
                  + (f" ± {100 * a['random_control_share_sem']:.0f}% (s.e. over the sets)"
                     if a.get("random_control_share_sem") is not None and (a.get("random_control_distinct_sets") or 0) > 1
                     else " (one distinct set: no spread over sets to give an s.e.)") + ".",
                  f"- All other heads together: ICL changes by "
                  f"{_pm(a['all_other_heads_icl_change_nats'], a['all_other_heads_icl_change_sem'])} (nats only: ablating "
                  "most of the model breaks it).", ""]
    p = h.get("path_patching") or {}
    if p:
        lines += ["## Previous-token head -> induction head: path patching", "",
                  f"Final {p['model']}, {p['n_prompts']} prompts of BOS + random tokens repeated twice; metric: "
                  f"second-copy loss (clean {p['clean_loss']:.3f} nats; {p['unrepeated_loss']:.3f} with the first "
                  f"copy replaced). On the clean prompt, the output of {p['sender']} (previous-token head) on its "
                  f"path into one input of {p['receiver']} (induction head) is resampled from another prompt "
                  "(every other path frozen); effect = loss increase, s.e. over prompts; share = effect / "
                  "(unrepeated - clean loss).", ""]
        for kind, what in (("k", "keys (K-composition)"), ("q", "queries (control)"), ("v", "values (control)")):
            d = p[kind]
            lines += [f"- into its {what}: {_pm(d['effect'], d['se'])}, share "
                      f"{100 * (d['share'] if d['share'] is not None else float('nan')):.0f}% (largest |effect| of "
                      f"any other pair: {d['other_pairs_max_abs_effect'] or 0:.3f} nats)."]
        lines += [""]
    sv = h.get("smear_vs_vanilla", {})
    if sv:
        lines += ["## Smeared keys (Argument 2), one schedule, equal tokens", ""]
        for key, row in sv.items():
            b, a = key.split("_vs_")
            se = row.get("icl_difference_sem", row.get("icl_difference_sem_unpaired"))
            how = (f"paired s.e. over the same {row['n_windows']:,} windows; unpaired it would be "
                   f"{row['icl_difference_sem_unpaired']:.3f}" if row.get("icl_difference_paired") else
                   "unpaired s.e.: the same windows, but no per-window scores kept to pair them")
            lines += [f"- at {_tok(row['tokens'])} tokens: {b} ICL {_pm(row[b]['icl_score'], row[b]['icl_sem'])}, "
                      f"best head's induction score {row[b]['induction_score']:.2f}; {a} ICL {_pm(row[a]['icl_score'], row[a]['icl_sem'])}, "
                      f"induction score {row[a]['induction_score']:.2f}"
                      + (f"; ICL {b} minus {a} {_pm(row['icl_difference'], se)} ({how}): "
                         + ("more than 2 s.e. from 0" if abs(row["icl_difference"]) > 2 * se
                            else "within 2 s.e., not resolved at these windows")
                         if se is not None else "") + "."]
        lines += [""]
    if "transient" in h:
        pos = h.get("icl_positions")  # the bands attention_by_band uses (transient_bands)
        early, late = ((f"positions {a}-{b}, which predict tokens {a + 2}-{b + 2}" for a, b in
                        (pos["transient_early"], pos["transient_late"]))
                       if pos and "transient_early" in pos else ("those predicting the ICL score's early band",
                                                                 "its late band"))
        lines += ["## The early transient", "",
                  "At the checkpoint between 0.3M and 5M tokens where each model's ICL score is highest: mean "
                  f"attention entropy of late ({late}) vs early ({early}) query positions, as a fraction of uniform "
                  "attention's entropy over the visible tokens:"]
        for m, t in h["transient"].items():
            icl = (f"ICL {_pm(t['icl_score'], t.get('icl_sem'))}"
                   + (f", the highest of {t['checkpoints']} checkpoints" if t.get("checkpoints") else ""))
            lines += [f"- {m} at {_tok(t['tokens'])} ({icl}): early "
                      f"{t.get('entropy_fraction_of_uniform_early', float('nan')):.2f}, late "
                      f"{t.get('entropy_fraction_of_uniform_late', float('nan')):.2f} of uniform "
                      f"({t.get('entropy_early', float('nan')):.2f} vs {t.get('entropy_late', float('nan')):.2f} nats); "
                      f"layer-0 attention on the previous token, early {t.get('layer0_prev_token_attention_early', float('nan')):.2f} "
                      f"vs late {t.get('layer0_prev_token_attention_late', float('nan')):.2f}."]
        with_sem = [t for t in h["transient"].values() if t.get("icl_sem") is not None]
        if with_sem:
            up = sum(t["icl_score"] > 2 * t["icl_sem"] for t in with_sem)
            lines += ["", f"A positive ICL score (more than 2 s.e. above 0, a lenient test for the highest of several "
                      f"scores) is seen in {up} of these {len(with_sem)} models"
                      + ("; without one there is no transient here to explain, and the attention numbers only "
                         "describe these checkpoints." if up < len(with_sem) else ".")]
        lines += [""]
    if h.get("seed_spread"):
        lines += spread_lines(h["seed_spread"])
    lines += [f"Figures in `{figures_dir}`; tables under `{out}` (each with provenance.json); numbers in "
              "`headline.json`."]
    from interventions.zoo.train import atomic_write_text

    path = out / "report.md"
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    figures_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(figures_dir / "REPORT.md", text)
    atomic_write_text(figures_dir / "headline.json", json.dumps(h, indent=1, default=_f) + "\n")
    return path
