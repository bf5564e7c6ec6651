"""The headline and report numbers from small synthetic result tables (no training, no model): what they
say where a window, a plateau test or a resolved difference is missing."""

import math

import pandas as pd
import pytest

from experiments import reproduce as rp
from experiments.common import Results


def _window_row(model, window: bool, plateau: bool) -> dict:
    """One row of the ``windows`` table as ``add_plateau(detect_windows(...))`` writes it."""
    nan = math.nan
    return {"model": model, "run_tokens": 20_000_000,
            "icl_window_start_tokens": 5.8e6 if window else nan, "icl_window_end_tokens": 9.1e6 if window else nan,
            "icl_window_rise": 0.20 if window else 0.10, "icl_window_n_checkpoints": 28 if window else 0,
            "icl_window_fit_rms": 0.02, "induction_window_fit_rms": 0.01 if window else nan,
            "icl_window_ends_inside": window,
            "induction_window_start_tokens": 6.5e6 if window else nan,
            "induction_window_end_tokens": 17.1e6 if window else nan, "induction_window_rise": 0.59 if window else -0.01,
            "induction_window_n_checkpoints": 44 if window else 0, "induction_window_ends_inside": False,
            "bump": False, "bump_start_tokens": nan, "bump_end_tokens": nan, "final_induction_score": 0.5,
            "final_icl": -0.4, "final_icl_sem": 0.07, "plateau_change": -0.006 if plateau else nan,
            "plateau_sem": 0.006 if plateau else nan, "plateaued": plateau}


def _tables(tmp_path, rows: list[dict]):
    """A phase_change folder with these windows and the least other tables ``headline`` reads."""
    res = Results(tmp_path, "phase_change")
    models = [r["model"] for r in rows]
    res.write("checkpoints", pd.DataFrame([{"model": m, "step": s, "tokens": 2048 * s, "val_loss": 3.0,
                                            "icl_score": -0.1, "icl_sem": 0.07, "icl_n": 256}
                                           for m in models for s in (1, 2)]))
    res.write("head_scores", pd.DataFrame([{"model": m, "step": s, "tokens": 2048 * s, "layer": 0, "head": 0,
                                            "score": "induction", "value": 0.1} for m in models for s in (1, 2)]))
    res.write("windows", pd.DataFrame(rows))
    res.write("icl_precise", pd.DataFrame(columns=["model", "point", "step", "tokens", "icl_score", "icl_sem", "n"]))
    res.write("transient", pd.DataFrame(columns=["model", "step", "tokens", "layer", "band", "entropy"]))


def test_headline_says_none_where_there_is_no_window_or_plateau_test(tmp_path):
    """A model without an ICL (or induction) window has no "ends inside" and one without the precise points
    has no plateau test: the headline says None, not False ("ends outside", "still moving"), and the seed
    spread does not count such runs as "0 of n" windows ending inside / plateaus. Where the test was made,
    its outcome stays true/false; the fitted fall is given with or without a window."""
    rows = [_window_row("attn-2l-s0", True, True), _window_row("attn-2l-s1", True, True),
            _window_row("attn-1l-s0", False, False), _window_row("attn-1l-s1", False, False),
            _window_row("smear-1l-s0", True, False), _window_row("smear-1l-s1", True, False)]
    _tables(tmp_path, rows)
    m = rp.headline(tmp_path)["models"]
    assert m["attn-1l-s0"]["icl_plateaued"] is None and m["smear-1l-s0"]["icl_plateaued"] is None
    assert m["attn-1l-s0"]["icl_window_ends_inside"] is None
    assert m["attn-2l-s0"]["icl_plateaued"] is True and m["attn-2l-s0"]["icl_window_ends_inside"] is True
    assert m["attn-2l-s0"]["induction_window_ends_inside"] is False
    assert m["attn-2l-s0"]["induction_window_end_fraction_of_run"] == pytest.approx(17.1e6 / 20e6)
    assert m["attn-1l-s0"]["induction_window_ends_inside"] is None
    assert m["attn-1l-s0"]["icl_window_fitted_fall"] == pytest.approx(0.10)
    assert m["attn-1l-s0"]["induction_window_fitted_rise"] is None  # no fit made (no fit rms): no size
    spread = rp.seed_spread(m)
    assert spread["attn-2l"]["icl_plateaued"] == {"true": 2, "n": 2}
    assert "icl_plateaued" not in spread["smear-1l"] and "icl_plateaued" not in spread["attn-1l"]
    assert "icl_window_ends_inside" not in spread["attn-1l"]
    assert spread["smear-1l"]["icl_window_ends_inside"] == {"true": 2, "n": 2}


def _report(tmp_path, monkeypatch, models: dict, **extra) -> str:
    h = {"machine": "m", "git_commit": "c", "git_dirty": False, "icl_definition": "d",
         "evaluation": {"windows_per_checkpoint": 256, "windows_precise": 2048, "pca_pairs": 2048},
         "models": models, **extra}
    monkeypatch.setattr(rp, "headline", lambda out, timings, git: h)
    rp.write_report(tmp_path, "cpu", {"total_s": 60.0, "train_s": 30.0}, tmp_path / "figures")
    return (tmp_path / "report.md").read_text()


def _model(window: bool) -> dict:
    return {"run_tokens": 20_000_000, "icl_window_start_tokens": 5.8e6 if window else None,
            "icl_window_end_tokens": 9.1e6 if window else None, "icl_window_width_ratio": 1.58 if window else None,
            "icl_window_end_fraction_of_run": 0.46 if window else None, "icl_window_ends_inside": True if window else None,
            "checkpoints_in_window": 28 if window else 0, "icl_window_fitted_fall": 0.203 if window else 0.104,
            "induction_window_start_tokens": 6.5e6 if window else None,
            "induction_window_end_tokens": 17.1e6 if window else None,
            "induction_window_end_fraction_of_run": 0.855 if window else None,
            "induction_window_ends_inside": False if window else None,
            "checkpoints_in_induction_window": 44 if window else 0,
            "induction_window_fitted_rise": 0.589 if window else -0.009,
            "final_induction_score": 0.5, "final_icl": -0.4, "final_icl_sem": 0.07, "bump": False}


def test_report_gives_each_window_its_fit_and_whether_it_ends_inside(tmp_path, monkeypatch):
    """Both windows say whether they end inside the run and how many checkpoints they hold (the induction
    window said neither: in the CPU run it ends at 85% of the run, not inside it), and "no window" names
    the fitted fall that missed the threshold (0.10 nats against 0.15 for attn-1l), so the margin shows."""
    text = _report(tmp_path, monkeypatch, {"attn-1l": _model(False), "attn-2l": _model(True)})
    two = next(x for x in text.splitlines() if x.startswith("- **attn-2l**"))
    assert "ICL window 5.8M - 9.1M tokens (fall 0.20 nats; 1.58x wide" in two, two
    assert "induction window 6.5M - 17.1M (rise 0.59; ends at 86% of the run, NOT inside it, 44 checkpoints inside)" in two, two
    one = next(x for x in text.splitlines() if x.startswith("- **attn-1l**"))
    assert "its fitted fall 0.10 nats)" in one and "its fitted rise -0.01)" in one, one
    assert "carry no standard error" in text


def test_smear_vs_vanilla_states_the_difference_and_whether_it_is_resolved(tmp_path, monkeypatch):
    """The smeared-vs-vanilla comparison gives the ICL difference with its (unpaired) s.e. and says when it
    is within 2 s.e. (the CPU run: -0.19 +- 0.11 and -0.11 +- 0.11 nats), instead of two scores side by side."""
    ck = pd.DataFrame([{"model": m, "step": 1, "tokens": 6_000_000, "icl_score": v, "icl_sem": s}
                       for m, v, s in (("attn-1l", -0.102, 0.083), ("smear-1l", -0.294, 0.076),
                                       ("attn-2l", -0.201, 0.080), ("smear-2l", -0.601, 0.074))])
    hs = pd.DataFrame([{"model": m, "tokens": 6_000_000, "score": "induction", "value": 0.5} for m in ck.model])
    sv = rp.smear_vs_vanilla(ck, hs)
    one, two = sv["smear-1l_vs_attn-1l"], sv["smear-2l_vs_attn-2l"]
    assert one["icl_difference"] == pytest.approx(-0.192)
    assert one["icl_difference_sem_unpaired"] == pytest.approx(math.hypot(0.083, 0.076))
    assert two["icl_difference"] == pytest.approx(-0.400)
    text = _report(tmp_path, monkeypatch, {}, smear_vs_vanilla=sv)
    lines = {k: next(x for x in text.splitlines() if f"{k} minus" in x) for k in ("smear-1l", "smear-2l")}
    assert "smear-1l minus attn-1l -0.192 ± 0.113 nats (unpaired s.e." in lines["smear-1l"]
    assert "within 2 s.e., not resolved" in lines["smear-1l"]
    assert "more than 2 s.e." in lines["smear-2l"] and "not resolved" not in lines["smear-2l"]


def test_smear_vs_vanilla_takes_the_paired_rows_of_the_precise_table(tmp_path, monkeypatch):
    """With ``icl_precise``'s smear rows at the common token count, the comparison takes their scores and
    the paired s.e. (resolving a difference the unpaired s.e. leaves within 2 s.e.); rows at another token
    count, or a missing difference row, fall back to the unpaired comparison."""
    ck = pd.DataFrame([{"model": m, "step": 1, "tokens": 6_000_000, "icl_score": v, "icl_sem": s}
                       for m, v, s in (("attn-2l", -0.201, 0.080), ("smear-2l", -0.310, 0.074))])
    hs = pd.DataFrame([{"model": m, "tokens": 6_000_000, "score": "induction", "value": 0.5} for m in ck.model])
    prec = pd.DataFrame([{"model": m, "point": p, "step": 1, "tokens": 6_000_000, "icl_score": v, "icl_sem": s, "n": 2048}
                         for m, p, v, s in (("attn-2l", "smear_compare", -0.20, 0.030),
                                            ("smear-2l", "smear_compare", -0.31, 0.028),
                                            ("smear-2l", "smear_minus_vanilla", -0.11, 0.012))])
    row = rp.smear_vs_vanilla(ck, hs, prec)["smear-2l_vs_attn-2l"]
    assert row["icl_difference_paired"] and row["n_windows"] == 2048
    assert (row["icl_difference"], row["icl_difference_sem"]) == (pytest.approx(-0.11), pytest.approx(0.012))
    assert row["smear-2l"]["icl_score"] == pytest.approx(-0.31) and row["attn-2l"]["icl_sem"] == pytest.approx(0.030)
    assert row["icl_difference_sem_unpaired"] == pytest.approx(math.hypot(0.030, 0.028))
    text = _report(tmp_path, monkeypatch, {}, smear_vs_vanilla={"smear-2l_vs_attn-2l": row})
    line = next(x for x in text.splitlines() if "smear-2l minus attn-2l" in x)
    assert "-0.110 ± 0.012 nats (paired s.e. over the same 2,048 windows; unpaired it would be 0.041)" in line
    assert "more than 2 s.e." in line
    for other in (prec.assign(tokens=5_000_000), prec[prec.point != "smear_minus_vanilla"]):
        row = rp.smear_vs_vanilla(ck, hs, other)["smear-2l_vs_attn-2l"]
        assert not row["icl_difference_paired"] and row["smear-2l"]["icl_score"] == pytest.approx(-0.310)
        assert row["icl_difference_sem"] == pytest.approx(math.hypot(0.080, 0.074))


def test_transient_gives_the_highest_scores_se_and_says_when_none_is_resolved(tmp_path, monkeypatch):
    """The early transient is read at the checkpoint with the highest ICL score: the summary gives that
    score's s.e. (from the checkpoints table, at that step) and how many checkpoints it is the highest of,
    and the report says when no model shows a score above 2 s.e. (the CPU run: at most +0.02 +- 0.08)."""
    tr = pd.DataFrame([{"model": "attn-2l", "step": s, "tokens": 2048 * s, "layer": 0, "band": b, "entropy": 2.0,
                        "uniform_entropy": 2.5, "prev_token_attention": 0.1, "icl_score": v}
                       for s, v in ((1, -0.05), (2, 0.02), (3, -0.01)) for b in ("early", "late")])
    ck = pd.DataFrame([{"model": "attn-2l", "step": s, "icl_sem": sem} for s, sem in ((1, 0.5), (2, 0.08), (3, 0.5))])
    t = rp.transient_summary(tr, ck)["attn-2l"]
    assert t["icl_score"] == pytest.approx(0.02) and t["icl_sem"] == pytest.approx(0.08) and t["checkpoints"] == 3
    text = _report(tmp_path, monkeypatch, {}, transient={"attn-2l": t})
    assert "(ICL +0.020 ± 0.080 nats, the highest of 3 checkpoints)" in text
    assert "is seen in 0 of these 1 models; without one there is no transient here to explain" in text
    t_up = {**t, "icl_score": 0.3}
    assert "is seen in 1 of these 1 models." in _report(tmp_path, monkeypatch, {}, transient={"attn-2l": t_up})


def test_report_commit_by_hand_records_dirty_as_unknown(tmp_path, monkeypatch):
    """``report --commit X`` names a commit its tables' provenance cannot know; whether the tree was dirty
    is not known either: the headline records ``git_dirty`` null and the report says "dirty: unknown" (it
    recorded ``dirty: False``, which nothing backed up)."""
    from experiments import __main__ as cli

    (tmp_path / "phase_change").mkdir()
    (tmp_path / "phase_change" / "provenance.json").write_text("{}")
    seen = []
    monkeypatch.setattr(rp, "redraw", lambda out, scale, figures, git=None: seen.append(git) or "redrawn")
    assert cli.main(["report", "--results", str(tmp_path), "--commit", "abc"]) == 0
    assert seen == [{"commit": "abc", "dirty": None}]
    text = _report(tmp_path, monkeypatch, {"attn-2l": _model(True)}, git_dirty=None)
    assert "Commit c (dirty: unknown)." in text
    assert "(dirty: False)." in _report(tmp_path, monkeypatch, {"attn-2l": _model(True)})


def test_report_states_an_ablation_whose_shares_are_undefined(tmp_path, monkeypatch):
    """Shares without clean ICL to remove are NaN in the tables (``share_removed``), None in the headline:
    the report writes them as nan instead of crashing on 100 * None."""
    a = {"model": "attn-2l", "induction_heads": ["L1H0"], "icl_clean": 0.01, "icl_clean_sem": 0.02,
         "icl_share_removed": 0.4, "icl_share_removed_sem": None, "icl_change_nats": 0.1,
         "other_heads_single_share_min": None, "other_heads_single_share_max": None,
         "other_heads_single_share_sem_max": None, "other_heads_single_larger_icl": 0, "other_heads_n": 3,
         "windows": 64, "other_heads_single_windows": 32, "random_control_share": None,
         "random_control_share_sem": None, "random_control_draws": 2, "random_control_distinct_sets": 2,
         "all_other_heads_icl_change_nats": 0.2, "all_other_heads_icl_change_sem": 0.05}
    text = _report(tmp_path, monkeypatch, {"attn-2l": _model(True)}, ablation=a)
    assert "remove **40% ± nan%**" in text and "shares from nan% to nan%" in text


def test_report_says_how_many_distinct_random_sets_of_how_many_possible(tmp_path, monkeypatch):
    """The random control names its sets as ``random_head_sets`` made them: distinct, their size, and all of
    the possible ones or seeded draws of C(non-induction heads, size) possible."""
    import math

    base = {"model": "attn-2l", "induction_heads": ["L1H0"], "icl_clean": -0.4, "icl_clean_sem": 0.02,
            "icl_share_removed": 0.4, "icl_share_removed_sem": 0.1, "icl_change_nats": 0.1,
            "other_heads_single_share_min": 0.0, "other_heads_single_share_max": 0.1,
            "other_heads_single_share_sem_max": 0.05, "other_heads_single_larger_icl": 0, "other_heads_n": 7,
            "windows": 64, "other_heads_single_windows": 32, "random_control_share": 0.05,
            "random_control_share_sem": 0.02, "all_other_heads_icl_change_nats": 0.2,
            "all_other_heads_icl_change_sem": 0.05}
    for size, n in ((1, 6), (2, 6), (6, 6)):
        possible = math.comb(7, size)
        a = base | {"random_control_draws": min(n, possible), "random_control_distinct_sets": min(n, possible),
                    "random_control_set_size": size, "random_control_possible_sets": possible}
        text = _report(tmp_path, monkeypatch, {"attn-2l": _model(True)}, ablation=a)
        line = next(x for x in text.splitlines() if x.startswith("- Random control"))
        what = "single heads" if size == 1 else f"sets of {size} heads"
        how = "every possible one" if possible <= n else f"seeded draws without repeats, of {possible} possible"
        assert line.startswith(f"- Random control, {min(n, possible)} distinct {what} from the 7 non-induction "
                               f"heads ({how}): mean share 5% ± 2% (s.e. over the sets)")
