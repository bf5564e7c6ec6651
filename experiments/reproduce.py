"""The main job: the whole default reproduction, then figures and a short report.

``python -m experiments reproduce`` (CPU, embedded corpus, ~30 minutes on 2 cores). Re-running
resumes: trained models, evaluated checkpoints and finished tables are skipped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .common import Results, check_writable, owns_results


@owns_results("out")
def reproduce(out: Path = Path("results/default"), scale: str = "cpu", device: str | None = None,
              progress: bool = True, figures_dir: Path | None = None) -> Path:
    from .ablations import run_ablations
    from .circuit import run_circuit
    from .figures import make_figures
    from .phase_change import run_phase_change
    from .survey import run_survey
    from .zoo import SCALES, train_zoo

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
    device = device or ("cuda" if scale == "gpu" else "cpu")
    check_writable(out)
    out = Path(out)
    figures_dir = Path(figures_dir) if figures_dir else (Path("figures") if scale == "cpu" else out / "figures")
    t0 = time.time()
    timings = {}
    runs = train_zoo(scale, out / "runs", device=device, progress=progress)
    timings["train_s"] = time.time() - t0
    # ICL s.e. ~ 1/sqrt(windows): 512 windows give ~0.1 nats on bytes (128 gave ~0.2)
    n_windows = {"tiny": 32, "cpu": 512, "gpu": 2048}[scale]
    pc = run_phase_change(runs, out, n_windows=n_windows, device=device, progress=progress)
    timings["phase_change_s"] = time.time() - t0 - timings["train_s"]
    head_scores, windows = pc.read("head_scores"), pc.read("windows")
    for name in ("attn-2l", "smear-1l"):
        if name in runs:
            run_ablations(runs[name], name, head_scores, out, windows_table=windows,
                          n_windows=max(16, n_windows // 2), device=device, progress=progress)
    if "attn-2l" in runs:
        run_circuit(runs["attn-2l"], "attn-2l", head_scores, out, device=device)
    run_survey({name: str(run) for name, run in runs.items()}, out, device=device)
    timings["total_s"] = time.time() - t0
    timings = _accumulate_timings(out, timings)
    paths = make_figures(out, figures_dir)
    report = write_report(out, scale, timings, figures_dir)
    if scale == "cpu":
        shutil.copy(report, figures_dir / "REPORT.md")
    print(report.read_text())
    print(f"figures: {len(paths)} files in {figures_dir}")
    return report


def _accumulate_timings(out: Path, timings: dict) -> dict:
    """Add this invocation's times to those of earlier (interrupted or resumed) invocations."""
    runs = Results(out, "report").read_json("timings", default=[])
    legacy = Results(out, "report").read_json("headline")
    if not runs and legacy:  # a run made before timings were kept separately
        runs.append(legacy.get("timings", {}))
    runs.append(timings)
    Results(out, "report").write_json("timings", runs)
    return {k: sum(r.get(k, 0.0) for r in runs) for k in timings} | {"invocations": len(runs)}


def _nearest(ck: pd.DataFrame, tokens: float) -> pd.Series:
    return ck.iloc[int(np.argmin(np.abs(np.log(ck.tokens.clip(lower=1)) - np.log(max(tokens, 1)))))]


def headline(out: Path) -> dict:
    """The report's numbers, from the result tables."""
    pc = Results(out, "phase_change")
    ck, win = pc.read("checkpoints"), pc.read("windows")
    h: dict = {}
    if "attn-2l" in set(win.model):
        w = win[win.model == "attn-2l"].iloc[0]
        c2 = ck[ck.model == "attn-2l"].sort_values("tokens")
        h["window_tokens"] = [float(w.window_start_tokens), float(w.window_end_tokens)]
        if np.isfinite(w.window_start_tokens):
            before, after = _nearest(c2, w.window_start_tokens), _nearest(c2, w.window_end_tokens)
            h["icl_before"] = [float(before.icl_score), float(before.icl_sem), int(before.tokens)]
            h["icl_after"] = [float(after.icl_score), float(after.icl_sem), int(after.tokens)]
        h["icl_final_2l"] = float(c2.icl_score.iloc[-1])
        h["bump_tokens"] = [float(w.bump_start_tokens), float(w.bump_end_tokens)] if w.bump else None
        h["final_max_induction_2l"] = float(w.final_max_induction)
        sets = Results(out, "ablations_attn-2l").read_optional("sets")  # damaged: ResultError, never skipped
        if sets is not None:
            g = sets.groupby("group").icl_share_removed.mean()
            h["share_removed"] = {k: float(v) for k, v in g.items()}
            h["induction_heads"] = sets[sets.group == "induction heads"].heads.iloc[0]
    for name in ("attn-1l", "smear-1l", "attn-2l", "smear-2l"):
        sub = ck[ck.model == name]
        if len(sub):
            last = sub.sort_values("tokens").iloc[-1]
            h[f"final_icl_{name}"] = [float(last.icl_score), float(last.icl_sem), int(last.tokens)]
            h[f"final_max_induction_{name}"] = float(win[win.model == name].final_max_induction.iloc[0])
    h["windows"] = {r.model: [float(r.window_start_tokens), float(r.window_end_tokens)] for r in win.itertuples()}
    # smeared vs vanilla at equal training tokens (the shorter run's end)
    for a, b in (("attn-1l", "smear-1l"), ("attn-2l", "smear-2l")):
        if f"final_icl_{a}" in h and f"final_icl_{b}" in h:
            t = min(h[f"final_icl_{a}"][2], h[f"final_icl_{b}"][2])
            h[f"equal_tokens_{a}_{b}"] = {"tokens": t, **{m: float(_nearest(ck[ck.model == m].sort_values("tokens"), t)
                                                                .icl_score) for m in (a, b)}}
    return h


def write_report(out: Path, scale: str, timings: dict, figures_dir: Path) -> Path:
    from interventions.zoo.provenance import provenance

    h = headline(out)
    prov = provenance(config={"scale": scale}, timings=timings)
    Results(out, "report").write_json("headline", {**h, "timings": timings})

    def tok(x):
        return f"{x / 1e6:.1f}M" if x is not None and np.isfinite(x) else "n/a"

    lines = [f"# Reproduction report ({scale} scale)", "",
             f"Machine: {prov['machine']['platform']}, {prov['machine']['threads']} threads, "
             f"GPU: {prov['machine']['cuda'] or 'none'}. Commit {prov['git']['commit']} "
             f"(dirty: {prov['git']['dirty']}). Wall-clock: {timings['total_s'] / 60:.1f} min "
             f"(training {timings['train_s'] / 60:.1f} min), over {timings.get('invocations', 1)} invocation(s).", ""]
    if "window_tokens" in h:
        lines += [f"- **2L phase-change window** (steepest rise of the best head's induction score): "
                  f"{tok(h['window_tokens'][0])} - {tok(h['window_tokens'][1])} training tokens."]
    if "icl_before" in h:
        lines += [f"- **ICL score** (loss at late minus early token, nats; +- s.e.): before the window "
                  f"{h['icl_before'][0]:+.3f} +- {h['icl_before'][1]:.3f} (at {tok(h['icl_before'][2])}), after "
                  f"{h['icl_after'][0]:+.3f} +- {h['icl_after'][1]:.3f} (at {tok(h['icl_after'][2])})."]
    if h.get("bump_tokens"):
        lines += [f"- Loss-curve non-convex stretch: {tok(h['bump_tokens'][0])} - {tok(h['bump_tokens'][1])} tokens."]
    if "share_removed" in h:
        s = h["share_removed"]
        lines += [f"- **Share of the ICL score removed** (pattern-preserving zero ablation, final attn-2l): "
                  f"induction heads ({h.get('induction_heads')}) {100 * s.get('induction heads', float('nan')):.0f}%, "
                  f"all other heads {100 * s.get('other heads', float('nan')):.0f}%, random sets of the same size "
                  f"{100 * s.get('random', float('nan')):.0f}% (mean of draws)."]
    for a, b in (("attn-1l", "smear-1l"), ("attn-2l", "smear-2l")):
        eq = h.get(f"equal_tokens_{a}_{b}")
        if eq:
            lines += [f"- **{b} vs {a}** at {tok(eq['tokens'])} tokens: ICL score {eq[b]:+.3f} vs {eq[a]:+.3f} nats; "
                      f"best induction score at the end of each run {h[f'final_max_induction_{b}']:.2f} vs "
                      f"{h[f'final_max_induction_{a}']:.2f}."]
    if h.get("windows"):
        lines += ["- Phase-change windows (best induction score's steepest rise; none if it never rises by 0.1): "
                  + "; ".join(f"{m} {tok(v[0])} - {tok(v[1])}" if np.isfinite(v[0]) else f"{m} none"
                              for m, v in h["windows"].items()) + "."]
    lines += ["", f"Figures in `{figures_dir}`; tables under `{out}` (each with provenance.json)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
