"""Integration: the whole reproduction pipeline at tiny scale (synthetic repeated tokens, seconds)."""

import json

import pytest

from experiments.common import ResultError, Results
from experiments.reproduce import reproduce


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """The figures that ``experiments.figures``' functions draw, by name, kept instead of saved."""
    from experiments import figures

    saved = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out, name: saved.setdefault(name, fig) and [])
    return saved


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    report = reproduce(out=out, scale="tiny", progress=False, figures_dir=out / "figures")
    return out, report


def test_pipeline_writes_tables_figures_report(tiny_run):
    """Every experiment writes its tables with provenance; figures come as PNG and PDF; the report
    states the headline numbers."""
    out, report = tiny_run
    for exp in ("phase_change", "ablations_attn-2l", "circuit_attn-2l", "survey"):
        assert (out / exp / "provenance.json").is_file(), exp
    prov = json.loads((out / "phase_change" / "provenance.json").read_text())
    assert {"config", "versions", "git", "seed"} <= set(prov)
    pngs = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert len(pngs) >= 9 and sorted(p.stem for p in (out / "figures").glob("*.pdf")) == pngs
    text = report.read_text()
    assert "ICL window" in text and "Which heads carry the ICL" in text and "Smeared keys" in text
    head = json.loads((out / "figures" / "headline.json").read_text())
    assert head == json.loads((out / "report" / "headline.json").read_text())
    for key in ("wall_clock_min", "train_min", "machine", "pca_turn_deg", "smear_vs_vanilla", "ablation"):
        assert key in head, key
    for model in ("attn-1l", "attn-2l", "smear-1l", "smear-2l"):
        for key in ("run_tokens", "icl_window_start_tokens", "icl_window_end_tokens", "induction_window_start_tokens",
                    "induction_window_end_tokens", "checkpoints_in_window", "final_induction_score", "bump"):
            assert key in head[model], (model, key)
    for key in ("icl_before", "icl_before_sem", "icl_after", "icl_after_sem"):
        assert key in head["attn-2l"], key
    for key in ("induction_heads", "icl_share_removed", "icl_share_removed_sem", "other_heads_single_share_min",
                "other_heads_single_share_max", "random_control_share"):
        assert key in head["ablation"], key
    # the single-head shares come from the per-head sweep, on the first half of the sets' windows (the
    # report says how many each uses)
    assert head["ablation"]["other_heads_single_windows"] == head["ablation"]["windows"] // 2
    assert f"first {head['ablation']['other_heads_single_windows']:,})" in (out / "report.md").read_text()


def test_induction_heads_carry_the_icl(tiny_run):
    """The paper's direction: ablating the strongest induction head raises late-token loss far more
    than ablating any head of layer 0, and the induction-head set removes more of the ICL score than
    all other heads together."""
    out, _ = tiny_run
    res = Results(out, "ablations_attn-2l")
    ph = res.read("per_head")
    ph = ph[ph.kind == "pattern"]
    top = ph.sort_values("late_delta_loss").iloc[-1]
    assert top.layer == 1
    assert top.late_delta_loss > 2 * ph[ph.layer == 0].late_delta_loss.max()
    sets = res.read("sets").groupby("group").icl_share_removed.mean()
    assert sets["induction heads"] > sets["all other heads"] + 0.3


def test_smeared_one_layer_learns_in_context(tiny_run):
    """Smeared keys give a one-layer model an induction head; the vanilla one-layer model has none."""
    out, _ = tiny_run
    win = Results(out, "phase_change").read("windows").set_index("model")
    assert win.loc["smear-1l", "final_induction_score"] > 0.4 > win.loc["attn-1l", "final_induction_score"]
    assert win.loc["smear-1l", "final_icl"] < win.loc["attn-1l", "final_icl"] - 0.3


def test_single_experiment_commands(tiny_run, capsys):
    """`phase-change`, `ablations` and `circuit` run by name on a run folder (finished units are
    skipped and their tables printed); a folder that is not a run exits with code 2."""
    from experiments.__main__ import main

    out, _ = tiny_run
    run = str(out / "runs" / "attn-2l")
    assert main(["phase-change", run, "--out", str(out / "single"), "--windows", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out  # the report's sentences, a window or why there is none (not the wide table)
    assert printed.startswith("- **attn-2l** (") and "ICL window" in printed and "induction window" in printed
    assert f"Every column: {out / 'single' / 'phase_change' / 'windows.csv'}" in printed
    # the settings of the tables already in `out` (reproduce --scale tiny): other settings are refused
    assert main(["ablations", run, "--out", str(out), "--windows", "64", "--quiet"]) == 0
    assert main(["circuit", run, "--out", str(out)]) == 0
    assert "receiver_input" in capsys.readouterr().out  # the path-patching table
    with pytest.raises(SystemExit) as e:
        main(["circuit", str(out), "--out", str(out)])
    assert e.value.code == 2


def test_circuit_path_patching_shows_k_composition(tiny_run):
    """On the trained tiny attn-2l, resampling the previous-token head's output on its path into the
    induction head's keys raises the second-copy loss more than on its paths into the queries or the
    values (each by more than 2 standard errors of the difference); the report states it."""
    out, report = tiny_run
    pp = Results(out, "circuit_attn-2l").read("path_patch")
    key = pp[pp.sender_is_previous_token & pp.receiver_is_induction].set_index("receiver_input")
    assert len(key) == 3
    for control in ("q", "v"):
        diff = key.effect["k"] - key.effect[control]
        assert diff > 2 * (key.se["k"] ** 2 + key.se[control] ** 2) ** 0.5, (control, key)
    assert key.effect["k"] > 0.5
    assert "path patching" in report.read_text()


def test_circuit_is_recomputed_when_the_head_scores_choose_other_heads(tiny_run, tmp_path):
    """The circuit tables were keyed on the run alone: with head scores that name another previous-token head
    (e.g. a phase change recomputed at other --windows after its folder was deleted, as its refusal advises),
    `circuit` kept the tables of the old choice (senders' labels, receivers) without a word. Now recomputed."""
    import shutil

    from experiments.circuit import run_circuit

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    hs = Results(out, "phase_change").read("head_scores")
    pp = Results(copy, "circuit_attn-2l").read("path_patch")
    old_prev = pp[pp.sender_is_previous_token].sender.iloc[0]
    final = (hs.model == "attn-2l") & (hs.step == hs[hs.model == "attn-2l"].step.max())
    other = next(f"L0H{h}" for h in range(4) if f"L0H{h}" != old_prev)
    hs.loc[final & (hs.layer == 0) & (hs["head"] == int(other[3:])) & (hs.score == "previous_token"), "value"] = 10.0
    run_circuit(out / "runs" / "attn-2l", "attn-2l", hs, copy)
    pp = Results(copy, "circuit_attn-2l").read("path_patch")
    assert set(pp[pp.sender_is_previous_token].sender) == {other}


def test_attribution_resumes_per_checkpoint(tiny_run, monkeypatch):
    """Each attribution checkpoint is kept as its own keyed table: with the assembled table lost (an
    interruption), a re-run reuses them (no sweep runs again) and rebuilds the same table."""
    import interventions.primitives.sweep as S
    from experiments.ablations import run_ablations

    out, _ = tiny_run
    folder = out / "ablations_attn-2l"
    assert list(folder.glob("attribution_step_*.csv"))
    before = Results(out, "ablations_attn-2l").read("attribution")
    (folder / "attribution.csv").unlink()

    def no_sweep(*a, **k):
        raise AssertionError("a finished attribution checkpoint was recomputed")

    monkeypatch.setattr(S, "ablation_sweep", no_sweep)
    run_ablations(out / "runs" / "attn-2l", "attn-2l", None, out,
                  windows_table=Results(out, "phase_change").read("windows"), n_windows=64, progress=False)
    after = Results(out, "ablations_attn-2l").read("attribution")
    assert after.equals(before)


def test_report_redraws_from_the_tables_alone(tiny_run, tmp_path):
    """``report`` on a copy of the tables without run folders or arrays (what comes back from a GPU
    machine): the same numbers and figure files, timings summed over the recorded invocations, the
    given commit; with no tables it is a usage error that creates nothing."""
    import shutil

    from experiments.__main__ import main
    from experiments.reproduce import redraw

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    redraw(copy, "tiny", copy / "figures", git={"commit": "abc", "dirty": False})
    a, b = (json.loads((d / "figures" / "headline.json").read_text()) for d in (out, copy))
    assert b["git_commit"] == "abc" and b["machine"] == a["machine"]
    for key in ("models", "ablation", "smear_vs_vanilla", "pca_turn_deg", "wall_clock_min", "train_min"):
        assert b[key] == a[key], key
    assert sorted(p.name for p in (copy / "figures").iterdir()) == sorted(p.name for p in (out / "figures").iterdir())
    for png in (out / "figures").glob("*.png"):  # figures are a function of the tables (seeded bootstrap bands)
        assert (copy / "figures" / png.name).read_bytes() == png.read_bytes(), png.name
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(tmp_path / "none")])
    assert e.value.code == 2
    assert not (tmp_path / "none").exists()


def test_report_takes_the_scale_from_the_tables(tiny_run, tmp_path, capsys):
    """``report`` without --scale names the scale the tables were made at (it said "cpu" for any
    tables); a --scale the tables contradict is refused before anything is written."""
    import shutil

    from experiments.__main__ import main

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(copy), "--scale", "cpu"])
    assert e.value.code == 2 and "--scale tiny" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert main(["report", "--results", str(copy)]) == 0
    assert (copy / "report.md").read_text().startswith("# Reproduction report (tiny scale)")


def test_report_refuses_bad_input_before_writing(tiny_run, tmp_path):
    """A --figures that is a file or holds a damaged figures manifest, no recorded timings, or no
    invocation that ran to completion: exit 2, nothing written (a --figures file crashed after the
    windows were rewritten)."""
    import shutil

    from experiments.__main__ import main
    from experiments.figures import DRAWN

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    (tmp_path / "file").write_text("")
    (copy / "figures").mkdir()
    (copy / "figures" / DRAWN).write_text("{")
    timings = Results(copy, "report").read_json("timings")
    for case in ("manifest", "figures", "none", "interrupted"):
        if case == "figures":
            shutil.rmtree(copy / "figures")
        if case == "none":
            (copy / "report" / "timings.json").unlink()
        if case == "interrupted":
            Results(copy, "report").write_json("timings", [{**r, "complete": False} for r in timings])
        before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
        args = ["report", "--results", str(copy), "--scale", "tiny"]
        with pytest.raises(SystemExit) as e:
            main(args + (["--figures", str(tmp_path / "file")] if case == "figures" else []))
        assert e.value.code == 2, case
        assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before, case


def test_report_and_figures_refuse_a_damaged_table_before_writing(tiny_run, tmp_path):
    """An edited table (here the path-patching one, read last): `report` and `figures` exit 2 naming it
    and write nothing; they redrew the windows and every figure read before it, then stopped, leaving
    new figures beside the old report and headline."""
    import shutil

    from experiments.__main__ import main

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "*.npy"))
    path = copy / "circuit_attn-2l" / "path_patch.csv"
    path.write_text(path.read_text().replace("0", "1", 1))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    for argv in (["report", "--results", str(copy)], ["figures", "--results", str(copy), "--out", str(copy / "figures")],
                 ["figures", "--results", str(copy), "--out", str(tmp_path / "new")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before, argv
    assert not (tmp_path / "new").exists()


def test_report_refuses_a_folder_missing_an_experiment_of_the_job(tiny_run, tmp_path):
    """Tables copied back without one experiment's folder (here the circuit's, or the survey's): `report`
    redrew without a word, its path-patching section and headline numbers (or the mosaic) silently gone.
    Now exit 2 naming the folder, nothing written; copying it back makes the report as before."""
    import shutil

    from experiments.__main__ import main

    out, _ = tiny_run
    for missing in ("circuit_attn-2l", "survey"):
        copy = tmp_path / missing
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy", missing))
        before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit) as e:
            main(["report", "--results", str(copy)])
        assert e.value.code == 2, missing
        assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before, missing
    shutil.copytree(out / "survey", copy / "survey")
    assert main(["report", "--results", str(copy)]) == 0
    assert "path_patching" in json.loads((copy / "figures" / "headline.json").read_text())


def test_report_refuses_tables_of_an_invocation_killed_after_training(tiny_run, tmp_path):
    """A complete invocation, then another (e.g. ``--seeds 2`` into the same --out) killed after training,
    mid-evaluation or mid-ablation: its tables are partial (sections silently missing, the survey of the
    older runs), so ``report`` refuses (exit 2, nothing written) instead of drawing them as a finished
    run because some earlier invocation completed. One killed during training changed no table."""
    import shutil

    from experiments.__main__ import main
    from experiments.common import InputError
    from experiments.reproduce import redraw

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    timings = Results(copy, "report").read_json("timings")
    Results(copy, "report").write_json("timings", timings + [{"complete": False, "total_s": 9.0, "train_s": 5.0}])
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(copy), "--scale", "tiny"])
    assert e.value.code == 2
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    with pytest.raises(InputError, match="interrupted"):
        redraw(copy, "tiny", copy / "figures")
    # killed during training (no stage finished): the tables are the complete invocation's
    Results(copy, "report").write_json("timings", timings + [{"complete": False, "total_s": 3.0}])
    redraw(copy, "tiny", copy / "figures")


def test_wall_clock_counts_only_invocations_of_the_same_job(tiny_run, tmp_path):
    """An earlier invocation into the same --out with other options (here: --seeds 2, whose runs these
    tables do not use) is not part of these tables' wall-clock or invocation count."""
    import shutil

    from experiments.reproduce import redraw

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    timings = Results(copy, "report").read_json("timings")
    assert all(r.get("job") == {"scale": "tiny", "seeds": 1, "corpus": None} for r in timings)
    other = {"complete": True, "total_s": 600.0, "train_s": 500.0, "phase_change_s": 90.0, "ablations_s": 5.0,
             "job": {"scale": "tiny", "seeds": 2, "corpus": None}}
    Results(copy, "report").write_json("timings", [other] + timings)
    redraw(copy, "tiny", copy / "figures")
    head = json.loads((copy / "figures" / "headline.json").read_text())
    assert head["wall_clock_min"] * 60 == pytest.approx(sum(r["total_s"] for r in timings))
    assert head["invocations"] == len(timings)


def test_report_refuses_an_attribution_made_at_other_windows(tiny_run, tmp_path):
    """``report`` re-derives the windows; an attribution table whose in-window checkpoints are not those
    windows' (made at windows of an older rule) is refused, not drawn under the new window's shading."""
    import shutil

    from experiments.reproduce import redraw

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    res = Results(copy, "ablations_attn-2l")
    at = res.read("attribution")
    assert len(at)
    res.write("attribution", at.assign(in_window=~at.in_window))
    with pytest.raises(ResultError, match="attribution"):
        redraw(copy, "tiny", copy / "figures")


def test_report_refuses_experiments_of_another_state_of_a_run(tiny_run, tmp_path):
    """``report`` on tables put together from two states of a run (e.g. a circuit folder left from an earlier
    training of attn-2l beside the phase change of the present one): the report's path-patching section and
    figures would describe another run than its phase-change sections. Refused, naming the folder, before
    anything is written."""
    import shutil

    from experiments.reproduce import redraw

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures"))
    res = Results(copy, "circuit_attn-2l")
    res.write("path_patch", res.read("path_patch"), inputs={"run": "0" * 20, "n_prompts": 16})
    with pytest.raises(ResultError, match="circuit_attn-2l was computed from another state of run attn-2l"):
        redraw(copy, "tiny", copy / "figures")
    assert not (copy / "figures").exists()


def test_figures_leave_out_an_attribution_made_at_other_windows(tiny_run, tmp_path, drawn, capsys):
    """`figures` (as `report` does) leaves out an attribution whose in-window checkpoints are not the windows
    table's (made before the windows were derived again by another rule): it drew it under the new window's
    shading, contradicting it; the line on stderr names it."""
    import shutil

    from experiments.figures import make_figures

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures", "*.npy"))
    make_figures(copy, tmp_path / "fig")
    assert "attribution_over_training_attn-2l" in drawn and "attribution.csv" not in capsys.readouterr().err
    drawn.clear()
    res = Results(copy, "ablations_attn-2l")
    at = res.read("attribution")
    res.write("attribution", at.assign(in_window=~at.in_window), inputs={"run": res.run_of("attribution")})
    make_figures(copy, tmp_path / "fig")
    assert "attribution_over_training_attn-2l" not in drawn and "ablation_icl_share_attn-2l" in drawn
    assert "ablations_attn-2l/attribution.csv is left out" in capsys.readouterr().err


def test_figures_refuse_to_draw_beside_a_report_of_other_tables(tiny_run, tmp_path, monkeypatch, capsys):
    """`figures --out DIR` where DIR holds the REPORT.md and headline.json of a reproduction (e.g. the default
    --out figures, which the cpu-scale main job draws into) whose tables have changed since (another
    phase change, ablation, ...) or are other results: the figures were replaced and the report kept, so the
    folder described two sets of tables. Refused (exit 2, nothing written); the same tables, wherever they
    were copied to, are drawn again."""
    import shutil

    from experiments import figures
    from experiments.__main__ import main

    monkeypatch.setattr(figures, "_save", _draw_stub)
    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs"))
    res = Results(copy, "circuit_attn-2l")
    res.write_provenance(res.settings())  # a rerun that recomputes nothing: the same tables
    assert main(["figures", "--results", str(copy), "--out", str(copy / "figures")]) == 0
    pp = res.read("path_patch")
    res.write("path_patch", pp.assign(effect=pp.effect + 1), inputs={"run": res.run_of("path_patch")})
    before = {p: p.read_bytes() for p in (copy / "figures").iterdir()}
    with pytest.raises(SystemExit) as e:
        main(["figures", "--results", str(copy), "--out", str(copy / "figures")])
    assert e.value.code == 2 and "REPORT.md" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (copy / "figures").iterdir()} == before


def test_report_names_the_commit_and_machine_that_evaluated_the_checkpoints(tiny_run, tmp_path, monkeypatch):
    """A reproduction stopped before its phase change wrote a table, then rerun at another commit on another
    machine, which made every table: `report` named the first invocation's commit and machine (the record's
    first), which made none of them (and its note said the tables were computed by the other)."""
    import hashlib
    import shutil

    from experiments import figures
    from experiments.reproduce import redraw

    monkeypatch.setattr(figures, "_save", _draw_stub)
    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures"))
    folder = copy / "phase_change"
    prov = json.loads((folder / "provenance.json").read_text())
    real = prov["invocations"][-1]
    stopped = {**real, "git": {"commit": "a" * 40, "dirty": True}, "machine": {**real["machine"], "platform": "other"}}
    prov = {**prov, **stopped, "invocations": [stopped, real]}  # the record kept from the stopped invocation
    (folder / "provenance.json").write_text(json.dumps(prov))
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest.values():
        entry["invocation"] = 1  # every table made by the rerun
    manifest["__settings__"]["sha256"] = hashlib.sha256((folder / "provenance.json").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    redraw(copy, "tiny", copy / "figures")
    head = json.loads((copy / "figures" / "headline.json").read_text())
    assert head["git_commit"] == real["git"]["commit"] and "other" not in head["machine"], head["machine"]
    assert "Tables computed by" not in (copy / "report.md").read_text()


def test_figures_leave_out_experiments_of_runs_not_in_the_tables(tiny_run, tmp_path, capsys):
    """An ablation / circuit folder of a run the phase-change tables no longer hold (left by an earlier
    invocation with other runs, e.g. before --seeds 2) is not drawn as if it were part of them; it is
    named on stderr."""
    import shutil

    from experiments.figures import make_figures

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "figures"))
    shutil.copytree(copy / "ablations_attn-2l", copy / "ablations_ghost")
    shutil.copytree(copy / "circuit_attn-2l", copy / "circuit_ghost")
    paths = make_figures(copy, tmp_path / "fig")
    assert paths and not [p for p in paths if "ghost" in p.name]
    assert [p for p in paths if "attn-2l" in p.name and "ablation" in p.name]  # the tables' own runs are drawn
    err = capsys.readouterr().err
    assert "ablations_ghost" in err and "circuit_ghost" in err


def _draw_stub(fig, out, name):
    """``figures._save`` without the rendering (fast): empty PNG and PDF files, the figure closed."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        p.write_bytes(b"")
    plt.close(fig)
    return paths


def test_redrawing_removes_only_the_figures_an_earlier_drawing_made(tmp_path, monkeypatch, capsys):
    """Redrawn after a rerun with fewer seeds, the folder holds no per-seed figure of the earlier drawing
    (it no longer comes from the tables), named on stderr; files the tool did not write survive, also
    figure-like ones, and a damaged manifest is refused before any figure is drawn."""
    from experiments import figures

    monkeypatch.setattr(figures, "_save", _draw_stub)
    res, out = Results(tmp_path, "phase_change"), tmp_path / "figures"
    ck, hs = _seeded_tables(seeds=(0, 1, 2))
    res.write("checkpoints", ck[ck.model.str.startswith("attn-2l")])
    res.write("head_scores", hs[hs.model.str.startswith("attn-2l")])
    first = {p.name for p in figures.make_figures(tmp_path, out)}
    assert {"head_scores_attn-2l-s1.png", "head_scores_attn-2l-s2.pdf"} <= first
    out.joinpath("notes.md").write_text("mine")
    out.joinpath("head_scores_mine.png").write_bytes(b"mine")  # figure-like, but no drawing made it
    res.write("checkpoints", ck[ck.model == "attn-2l-s0"])
    res.write("head_scores", hs[hs.model == "attn-2l-s0"])
    second = {p.name for p in figures.make_figures(tmp_path, out)}
    assert "head_scores_attn-2l-s0.png" in second and not [n for n in second if "-s1" in n or "-s2" in n]
    on_disk = {p.name for p in out.iterdir()}
    assert on_disk == second | {"notes.md", "head_scores_mine.png", figures.DRAWN}
    assert "head_scores_attn-2l-s2.pdf" in capsys.readouterr().err
    out.joinpath(figures.DRAWN).write_text("{not json")
    out.joinpath("head_scores_attn-2l-s0.png").unlink()
    with pytest.raises(ResultError, match="delete it"):
        figures.make_figures(tmp_path, out)
    assert {p.name for p in out.iterdir()} == on_disk - {"head_scores_attn-2l-s0.png"}  # nothing drawn


def test_several_seeds_report_their_spread(tmp_path, monkeypatch):
    """``seeds=2``: runs named MODEL-sK, each seed's attn-2l ablated and paired with its own attn-1l (the
    1-layer control and the PCA reference), and the headline's spread equals the per-run numbers'
    mean and s.d. (two models only, to stay fast)."""
    import statistics

    import pandas as pd

    from experiments import zoo

    monkeypatch.setitem(zoo.SCALES, "tiny", {k: v for k, v in zoo.SCALES["tiny"].items() if k in ("attn-1l", "attn-2l")})
    out = tmp_path / "seeds"
    report = reproduce(out=out, scale="tiny", progress=False, figures_dir=out / "figures", seeds=2)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["attn-1l-s0", "attn-1l-s1", "attn-2l-s0", "attn-2l-s1"]
    head = json.loads((out / "figures" / "headline.json").read_text())
    spread = head["seed_spread"]
    pc = Results(out, "phase_change")
    win = pc.read("windows").set_index("model")
    # which tiny seeds change phase within 1.5M tokens depends on the CPU's rounding (seed 1 does on AVX-512
    # machines, not on AVX2 ones): the spread is over the seeds that have the number, and one seed at least has it
    with_window = {m for m in ("attn-2l-s0", "attn-2l-s1") if pd.notna(win.loc[m, "icl_window_start_tokens"])}
    assert with_window
    for key in ("final_induction_score", "final_icl", "icl_before"):
        nums = [v for k in (0, 1) if (v := head["models"][f"attn-2l-s{k}"].get(key)) is not None]
        assert len(nums) == (len(with_window) if key == "icl_before" else 2)
        assert spread["attn-2l"][key]["mean"] == pytest.approx(statistics.mean(nums))
        assert spread["attn-2l"][key]["sd"] == (pytest.approx(statistics.stdev(nums)) if len(nums) > 1 else None)
        assert spread["attn-2l"][key]["n"] == len(nums)
    assert set(head["ablation_by_seed"]) == {"attn-2l-s0", "attn-2l-s1"}
    assert head["ablation"]["model"] == "attn-2l-s0"
    shares = [head["ablation_by_seed"][f"attn-2l-s{k}"]["icl_share_removed"] for k in (0, 1)]
    assert spread["attn-2l"]["ablation_icl_share_removed"]["mean"] == pytest.approx(statistics.mean(shares))
    prec = pc.read("icl_precise")
    assert set(prec[prec.point == "before_minus_attn1l"].model) == with_window
    assert pc.read("pca").pairs.nunique() == 1  # every seed's runs on the same PCA pairs: one joint fit
    turns = pc.read("pca_turn")
    # a turn for each run of the seeds whose attn-2l has a window, at that seed's window
    assert set(turns.model) == {f"attn-{n}l-s{m[-1]}" for m in with_window for n in (1, 2)}
    for row in turns.itertuples():
        assert row.window_start_tokens == win.loc["attn-2l-s" + row.model[-1], "icl_window_start_tokens"]
    assert "Spread across seeds" in report.read_text()


def _seeded_tables(seeds=(0, 1)):
    """Checkpoints and head scores of attn-1l/2l and smear-1l/2l runs named MODEL-sK, with numbers that
    tell every (model, seed, tokens) apart."""
    import pandas as pd

    ck, hs = [], []
    for i, model in enumerate(("attn-1l", "attn-2l", "smear-1l", "smear-2l")):
        for seed in seeds:
            for tokens in (1000, 2000, 3000):
                value = i + seed / 10 + tokens / 1e5
                ck.append({"model": f"{model}-s{seed}", "step": tokens // 100, "tokens": tokens,
                           "icl_score": -value, "icl_sem": 0.01, "val_loss": 3.0})
                hs.append({"model": f"{model}-s{seed}", "step": tokens // 100, "tokens": tokens, "layer": 0,
                           "head": 0, "score": "induction", "value": value})
    return pd.DataFrame(ck), pd.DataFrame(hs)


def test_smear_vs_vanilla_pairs_each_seed_with_its_twin():
    """With several seeds (runs MODEL-sK) each smeared run is compared with the same seed's vanilla run at
    the last common checkpoint (the headline's and report's "Smeared keys" section), not dropped."""
    from experiments.reproduce import smear_vs_vanilla

    ck, hs = _seeded_tables()
    sv = smear_vs_vanilla(ck, hs)
    assert set(sv) == {f"smear-{n}-s{k}_vs_attn-{n}-s{k}" for n in ("1l", "2l") for k in (0, 1)}
    row = sv["smear-2l-s1_vs_attn-2l-s1"]
    assert row["tokens"] == 3000
    for run, i in (("smear-2l-s1", 3), ("attn-2l-s1", 1)):
        assert row[run]["icl_score"] == pytest.approx(-(i + 0.1 + 0.03))
        assert row[run]["induction_score"] == pytest.approx(i + 0.1 + 0.03)
    one = smear_vs_vanilla(ck[ck.model.str.endswith("-s0")].assign(model=lambda d: d.model.str[:-3]),
                           hs[hs.model.str.endswith("-s0")].assign(model=lambda d: d.model.str[:-3]))
    assert set(one) == {"smear-1l_vs_attn-1l", "smear-2l_vs_attn-2l"}  # one seed: names without suffix


def _smear_axes(tmp_path, drawn, **seeded):
    """The smeared-vs-vanilla figure's first axes, drawn from ``_seeded_tables(**seeded)``."""
    from experiments import figures

    ck, hs = _seeded_tables(**seeded)
    res = Results(tmp_path, "phase_change")
    res.write("checkpoints", ck)
    res.write("head_scores", hs)
    figures.fig_smear(tmp_path, tmp_path / "figures")
    return drawn["smeared_vs_vanilla"].axes[0]


def test_smear_figure_groups_seeded_runs_by_layers(tmp_path, drawn):
    """The smeared-vs-vanilla figure's lines are the models (attn-1l, ..., each in its colour of the other
    figures) also for runs named MODEL-sK (not the runs, nor the seed suffix, which would average models
    into one line)."""
    ax = _smear_axes(tmp_path, drawn)
    labels = {t.get_text() for t in ax.figure.legends[0].get_texts()}
    assert labels == {"attn-1l", "attn-2l", "smear-1l", "smear-2l"}, labels
    means = {round(y, 6) for line in ax.get_lines() for y in line.get_ydata()}
    assert round(-(0 + 0.05 + 0.01), 6) in means  # attn-1l at 1000 tokens, mean of its two seeds only



def test_seed_lines_draw_only_the_tokens_every_seed_has(tmp_path, drawn):
    """With several seeds, a model's line is the mean over all its seeds: a token count that only some
    seeds reached (one seed trained longer) is not drawn as a "mean" of fewer seeds with a zero band."""
    import pandas as pd

    from experiments import figures

    grid = {0: (1000, 2000, 3000), 1: (1000, 2000, 3000), 2: (1000, 2000, 3000, 4000)}
    ck = pd.DataFrame([{"model": f"attn-2l-s{s}", "step": t // 100, "tokens": t, "icl_score": -1.0 - s,
                        "icl_sem": 0.01, "val_loss": 3.0 + s} for s, ts in grid.items() for t in ts])
    Results(tmp_path, "phase_change").write("checkpoints", ck)
    figures.fig_loss_curves(tmp_path, tmp_path / "figures")
    line = next(x for x in drawn["loss_curves"].axes[0].get_lines() if len(x.get_xdata()))
    assert list(line.get_xdata()) == [1000, 2000, 3000] and set(line.get_ydata()) == {4.0}


def test_pca_figure_marks_each_trajectory_end_without_text_on_the_markers(tmp_path, drawn):
    """Each run's last checkpoint is a marker named in the legend beside every model; no text is drawn
    on the markers (an "end" label sat on each trajectory's last marker, and on the other run's label
    where two runs end close together)."""
    import pandas as pd

    from experiments import figures

    ends = {"attn-1l": (1.0, 1.0), "attn-2l": (1.02, 1.0)}  # two runs ending next to each other
    pca = pd.DataFrame([{"model": m, "step": s, "tokens": 10 ** (s + 5), "pc1": x - (3 - s) / 3,
                         "pc2": y + (3 - s) / 3, "var_pc1": 0.4, "var_pc2": 0.2}
                        for m, (x, y) in ends.items() for s in range(4)])
    Results(tmp_path, "phase_change").write("pca", pca)
    figures.fig_pca(tmp_path, tmp_path / "figures")
    fig = drawn["per_token_loss_pca"]
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(ends) | {figures.END_LABEL}
    for model, (x, y) in ends.items():
        colour = next(line.get_color() for line in ax.get_lines() if line.get_label() == model)
        assert [line for line in ax.get_lines() if line.get_marker() == figures.END_MARKER
                and line.get_color() == colour and (line.get_xdata()[0], line.get_ydata()[0]) == (x, y)], model
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    points = ax.transData.transform(pca[["pc1", "pc2"]].to_numpy())
    for text in ax.texts:
        box = text.get_window_extent(r).expanded(1.2, 1.2)
        assert not any(box.contains(px, py) for px, py in points), f"{text.get_text()!r} on a marker"


def test_pca_figure_draws_each_set_of_pairs_in_its_own_panel(tmp_path, drawn):
    """Runs evaluated on different PCA pairs (other corpus or context) have PCs of separate fits: never
    drawn on one pair of axes under the first fit's variance, but one panel per fit."""
    import numpy as np
    import pandas as pd

    from experiments import figures
    from experiments.phase_change import pca_by_pairs

    g = np.random.default_rng(0)
    vectors = {"attn-2l": g.normal(size=(4, 8)), "attn-1l": g.normal(size=(4, 8)), "other": 9 * g.normal(size=(4, 8))}
    ck = pd.DataFrame([{"model": m, "step": s, "tokens": 10 ** (s + 5)} for m in vectors for s in range(4)])
    pca = pca_by_pairs(vectors, ck, {"attn-2l": "p", "attn-1l": "p", "other": "q"})
    Results(tmp_path, "phase_change").write("pca", pca)
    figures.fig_pca(tmp_path, tmp_path / "figures")
    axes = [ax for ax in drawn["per_token_loss_pca"].axes if ax.get_lines()]
    assert len(axes) == 2
    for ax, fp in zip(axes, ("p", "q")):
        var = pca[pca.pairs == fp].var_pc1.iloc[0]
        assert f"({100 * var:.0f}% var." in ax.get_xlabel()
        names = {t.get_text() for t in ax.get_legend().get_texts()}
        assert names == set(pca[pca.pairs == fp].model) | {figures.END_LABEL}

@pytest.mark.parametrize("n_ctx, early, late, band", [(64, 6, 62, 1), (256, 25, 250, 5), (512, 50, 500, 10)])
def test_report_states_the_icl_tokens_of_the_runs_context(n_ctx, early, late, band):
    """The report's ICL definition names the token numbers of the runs' own context (the paper's 50th and
    500th of 512 scaled, band 10/512 of the context), not 256's at every scale; the transient's bands are
    the query positions that predict those bands of tokens (token t at position t - 2)."""
    from experiments.reproduce import icl_definition, icl_positions

    assert f"(early, late = {early}, {late} of {n_ctx}; b = {band})" in icl_definition(n_ctx)
    p = icl_positions(n_ctx)
    assert (p["transient_early"], p["transient_late"]) == ([early - band - 2, early + band - 2],
                                                           [late - band - 2, late + band - 2])


def test_an_interrupted_invocation_keeps_its_finished_stages_in_the_wall_clock(tmp_path, monkeypatch):
    """A run killed after training (here: the evaluation raises) has its training time recorded, marked
    incomplete; the resumed run's report adds it and says one invocation was interrupted."""
    from experiments import phase_change, zoo

    monkeypatch.setitem(zoo.SCALES, "tiny", {k: v for k, v in zoo.SCALES["tiny"].items() if k in ("attn-1l", "attn-2l")})
    out = tmp_path / "r"

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(phase_change, "run_phase_change", killed)
        with pytest.raises(KeyboardInterrupt):
            reproduce(out=out, scale="tiny", progress=False, figures_dir=out / "figures")
    first = Results(out, "report").read_json("timings")
    assert len(first) == 1 and first[0]["complete"] is False and first[0]["train_s"] > 0
    assert "phase_change_s" not in first[0] and first[0]["total_s"] >= first[0]["train_s"]
    report = reproduce(out=out, scale="tiny", progress=False, figures_dir=out / "figures")
    runs = Results(out, "report").read_json("timings")
    assert [r["complete"] for r in runs] == [False, True]
    head = json.loads((out / "figures" / "headline.json").read_text())
    assert head["wall_clock_min"] * 60 == pytest.approx(runs[0]["total_s"] + runs[1]["total_s"])
    assert head["invocations"] == 2 and head["invocations_interrupted"] == 1
    assert "1 of them interrupted" in report.read_text()


def test_report_names_both_checkpoints_of_the_one_layer_control(tmp_path, monkeypatch):
    """The 1-layer control is taken at its last checkpoint at or before attn-2l's "before" point, which
    can lie well before it (5.0M against 5.7M in the CPU run): the report says so and names both token
    counts, not "at the same tokens"."""
    from experiments import reproduce as rp

    two = {"run_tokens": 20_000_000, "icl_window_start_tokens": 5.8e6, "icl_window_end_tokens": 9.1e6,
           "icl_window_width_ratio": 1.58, "icl_window_end_fraction_of_run": 0.46, "icl_window_ends_inside": True,
           "checkpoints_in_window": 28, "induction_window_start_tokens": None, "final_induction_score": 0.5,
           "final_icl": -0.4, "final_icl_sem": 0.07, "bump": False,
           "icl_before": -0.107, "icl_before_sem": 0.028, "icl_before_tokens": 5_748_736,
           "icl_after": -0.303, "icl_after_sem": 0.027, "icl_after_tokens": 9_187_328,
           "icl_drop": -0.196, "icl_drop_sem": 0.011,
           "icl_before_minus_attn1l": -0.078, "icl_before_minus_attn1l_sem": 0.008}
    one = {k: two[k] for k in ("run_tokens", "final_induction_score", "final_icl", "final_icl_sem", "bump")} | {
        "icl_window_start_tokens": None, "induction_window_start_tokens": None,
        "icl_at_attn2l_before": -0.029, "icl_at_attn2l_before_sem": 0.029, "icl_at_attn2l_before_tokens": 4_997_120}
    h = {"machine": "m", "git_commit": "c", "git_dirty": False, "icl_definition": "d",
         "evaluation": {"windows_per_checkpoint": 256, "windows_precise": 2048, "pca_pairs": 2048},
         "models": {"attn-1l": one, "attn-2l": two}}
    monkeypatch.setattr(rp, "headline", lambda out, timings, git: h)
    rp.write_report(tmp_path, "cpu", {"total_s": 60.0, "train_s": 30.0}, tmp_path / "figures")
    line = next(x for x in (tmp_path / "report.md").read_text().splitlines() if "1-layer control" in x)
    assert "same tokens" not in line and "5.0M" in line and "5.7M" in line, line


def test_late_delta_loss_is_the_icl_late_band(tiny_run):
    """``per_head.late_delta_loss`` is the ablation's loss change on the ICL score's late band (tokens
    late-b..late+b, as ``icl_band_losses``), not on the last 2b + 1 tokens of the window (one later)."""
    import numpy as np

    from interventions.analysis.metrics import icl_band, icl_indices

    out, _ = tiny_run
    res = Results(out, "ablations_attn-2l")
    per, by = res.read("per_head"), res.read("per_head_by_index")
    pos = int(by.token_index.max()) + 1  # token_index t: the loss of (1-indexed) token t + 1
    early, late = icl_indices(pos)
    b = icl_band(pos)
    for r in per[per.kind == "pattern"].itertuples():
        d = by[(by.kind == "pattern") & (by.head_name == r.head_name)].set_index("token_index").delta_loss
        want = d.loc[late - b - 1:late + b - 1].mean()  # tokens late-b..late+b
        assert np.isclose(r.late_delta_loss, want, rtol=1e-4, atol=1e-6), (r.head_name, r.late_delta_loss, want)


def test_smeared_minus_vanilla_is_paired_over_the_same_windows(tiny_run):
    """``icl_precise``'s smeared-vs-vanilla rows, recomputed by plain forwards of the two checkpoints at the
    largest common token count: each model's ICL score and the paired difference (mean and s.e. over the
    windows of late-band minus early-band loss); the headline carries them beside the unpaired s.e., and
    the report says it is paired."""
    import math

    import torch

    from experiments.phase_change import eval_windows, run_config, step_tokens
    from interventions.analysis.metrics import icl_band, icl_indices
    from interventions.zoo.train import list_checkpoints, load_model

    out, report = tiny_run
    prec = Results(out, "phase_change").read("icl_precise")
    runs = {m: out / "runs" / m for m in ("attn-1l", "smear-1l", "attn-2l", "smear-2l")}
    head = json.loads((out / "figures" / "headline.json").read_text())
    for a, b in (("attn-1l", "smear-1l"), ("attn-2l", "smear-2l")):
        cfg = run_config(runs[b])
        tokens = {m: {step_tokens(c, run_config(runs[m]))[1]: c for c in list_checkpoints(runs[m])} for m in (a, b)}
        t = max(set(tokens[a]) & set(tokens[b]))
        diff = prec[(prec.model == b) & (prec.point == "smear_minus_vanilla")].iloc[0]
        wins = eval_windows(cfg, int(diff.n))
        early, late = icl_indices(cfg.n_ctx)
        band = icl_band(cfg.n_ctx)
        per = {}
        for m in (a, b):  # per-window late-band minus early-band loss, by plain forwards
            with torch.no_grad():
                logp = load_model(tokens[m][t]).eval()(wins).logits.double().log_softmax(-1)
            loss = -logp[:, :-1].gather(-1, wins[:, 1:, None]).squeeze(-1)  # column j: token j + 2's loss
            per[m] = loss[:, late - band - 2:late + band - 1].mean(1) - loss[:, early - band - 2:early + band - 1].mean(1)
            row = prec[(prec.model == m) & (prec.point == "smear_compare")].iloc[0]
            assert row.tokens == t
            assert math.isclose(row.icl_score, per[m].mean().item(), abs_tol=1e-5), (m, row.icl_score)
        d = per[b] - per[a]
        assert diff.tokens == t
        assert math.isclose(diff.icl_score, d.mean().item(), abs_tol=1e-5)
        assert math.isclose(diff.icl_sem, (d.std() / math.sqrt(len(d))).item(), rel_tol=1e-3)
        sv = head["smear_vs_vanilla"][f"{b}_vs_{a}"]
        assert sv["icl_difference_paired"] and sv["tokens"] == t and sv["n_windows"] == len(d)
        assert sv["icl_difference"] == pytest.approx(d.mean().item(), abs=1e-5)
        assert sv["icl_difference_sem"] == pytest.approx(diff.icl_sem)
        assert sv["icl_difference_sem_unpaired"] == pytest.approx(math.hypot(sv[a]["icl_sem"], sv[b]["icl_sem"]))
        assert f"{b} minus {a}" in report.read_text() and "paired s.e. over the same" in report.read_text()


def test_loss_curves_mark_a_bump_of_one_checkpoint(tmp_path, drawn):
    """The loss-bump overlay shows every model's bump, also one whose stretch is a single checkpoint
    (start == end, as attn-1l's and attn-2l's in the main job): a line through one point draws nothing."""
    import math

    import pandas as pd

    from experiments import figures

    ck = pd.DataFrame([{"model": m, "step": t // 100, "tokens": t, "icl_score": -1.0, "icl_sem": 0.01,
                        "val_loss": 5.0 - t / 1e3} for m in ("attn-1l", "attn-2l") for t in (1000, 2000, 3000)])
    win = pd.DataFrame([{"model": "attn-1l", "bump": True, "bump_start_tokens": 2000.0, "bump_end_tokens": 2000.0},
                        {"model": "attn-2l", "bump": False, "bump_start_tokens": math.nan,
                         "bump_end_tokens": math.nan}])
    res = Results(tmp_path, "phase_change")
    res.write("checkpoints", ck)
    res.write("windows", win)
    figures.fig_loss_curves(tmp_path, tmp_path / "figures")
    overlay = [x for x in drawn["loss_curves"].axes[0].get_lines() if x.get_color() == "k" and len(x.get_xdata())]
    assert len(overlay) == 1 and list(overlay[0].get_xdata()) == [2000]
    assert overlay[0].get_marker() not in (None, "", "None", " ")  # visible as a point


def test_loss_by_index_figure_draws_one_row_per_model_with_seeds(tmp_path, drawn):
    """With several seeds the loss-by-index heatmap has one row per model (its lowest seed, named in the
    row's label), not one per run (21 rows, a 38-inch figure, at the gpu scale); every model is drawn."""
    import pandas as pd

    from experiments import figures

    rows = [{"model": f"{m}-s{s}", "step": t // 100, "tokens": t, "token_index": i, "loss": 3.0 - i / 100 - s,
             "sem": 0.1} for s in (1, 0, 2) for m in ("attn-1l", "attn-2l") for t in (2e5, 4e5, 8e5) for i in range(1, 64)]
    Results(tmp_path, "phase_change").write("loss_by_index", pd.DataFrame(rows))
    figures.fig_loss_heatmap(tmp_path, tmp_path / "figures")
    labels = [ax.get_ylabel() for ax in drawn["loss_by_index_over_training"].axes if ax.get_ylabel().endswith("token index")]
    assert labels == ["attn-1l-s0\ntoken index", "attn-2l-s0\ntoken index"]


def test_smear_figure_band_is_the_seed_range_and_says_so(tmp_path, drawn):
    """With several seeds the smeared-vs-vanilla band is the seed min-max and the panel says so (it was
    seaborn's unlabelled default, a bootstrap 95% CI over the seeds, narrower than their range)."""
    from experiments import figures

    ax = _smear_axes(tmp_path, drawn, seeds=range(5))
    assert ax.get_title() == figures.SEED_BANDS
    bands = {(round(v[v[:, 0] == 1000][:, 1].min(), 6), round(v[v[:, 0] == 1000][:, 1].max(), 6))
             for c in ax.collections for p in c.get_paths() for v in [p.vertices] if (v[:, 0] == 1000).any()}
    assert (-0.41, -0.01) in bands, bands  # attn-1l at 1000 tokens: seeds 0..4 give -0.01 .. -0.41


def test_training_curves_wall_clock_axis_has_only_its_minute_ticks(tmp_path, drawn):
    """The top axis of wall-clock minutes carries only its labelled minute ticks, not the token axis's log
    minor ticks (2..9 x 10^k tokens), which mean nothing in minutes."""
    import pandas as pd

    from experiments import figures

    tr = pd.DataFrame([{"model": "attn-2l", "tokens": t, "val_loss": 3.0, "repeat_loss_first": 5.0,
                        "repeat_loss_second": 4.0, "wall_s": t / 1e4} for t in (1e3, 1e4, 1e5, 1e6, 1e7)])
    Results(tmp_path, "phase_change").write("training", tr)
    figures.fig_training_curves(tmp_path, tmp_path / "figures", "attn-2l")
    top = drawn["training_curves_attn-2l"].axes[0].child_axes[0]
    assert len(top.get_xticks()) > 1 and len(top.xaxis.get_minorticklocs()) == 0


def test_patching_and_head_score_figures_name_the_model_and_do_not_overlap(tmp_path, drawn):
    """The per-model figures say which model they show (not only the file name), the head-score legend
    and panels are named in words, and the patching figure's head axis label clears its head labels
    (it was drawn on top of them)."""
    import pandas as pd

    from experiments import figures

    heads = [(layer, head) for layer in (0, 1) for head in range(4)]
    circ = Results(tmp_path, "circuit_attn-2l")
    circ.write("patch_heads", pd.DataFrame([{"layer": la, "head": h, "restored": 0.1 * h} for la, h in heads]))
    circ.write("patch_head_pos", pd.DataFrame([{"head_name": f"L{la}H{h}", "position": p, "restored": 0.01 * p}
                                               for la, h in heads for p in range(101)]))
    Results(tmp_path, "phase_change").write("head_scores", pd.DataFrame(
        [{"model": "attn-2l", "step": t // 100, "tokens": t, "layer": la, "head": h, "score": s, "value": 0.1}
         for t in (1000, 2000) for la, h in heads for s in ("induction", "previous_token", "prefix_matching")]))
    figures.fig_patching(tmp_path, tmp_path / "figures", "attn-2l")
    figures.fig_head_scores(tmp_path, tmp_path / "figures", "attn-2l")
    fig = drawn["patching_attn-2l"]
    assert "attn-2l" in fig.axes[0].get_title()
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    label = fig.axes[1].yaxis.label.get_window_extent(r)
    assert not any(label.overlaps(t.get_window_extent(r)) for t in fig.axes[1].get_yticklabels()), "label on the heads"
    assert not label.overlaps(fig.axes[0].get_window_extent(r))
    g = drawn["head_scores_attn-2l"]
    assert "attn-2l" in g._suptitle.get_text()
    assert g.legends[0].get_title().get_text() == "head"
    assert "previous token score" in {ax.get_title() for ax in g.axes}


def test_report_says_what_no_window_and_the_random_control_are(tiny_run):
    """The report's "no window" names the rule's numbers (fit range, least fall or rise), a bump of one
    checkpoint is called that (not "X - X"), the plateau's s.e. is paired over the precise windows, and the
    random control says how many distinct sets it ablated, of how many heads, out of how many possible (at
    tiny scale the only set of 2 of 2 non-induction heads, once: draws with repeats ablated it 6 times, whose
    s.e. of 0 would be no s.e.), each as the tables hold it."""
    import math

    import pandas as pd

    from experiments.phase_change import MIN_ICL_DROP, MIN_INDUCTION_RISE, WINDOW_P
    from experiments.reproduce import _pval

    out, report = tiny_run
    text = report.read_text()
    win = pd.read_csv(out / "phase_change" / "windows.csv")
    lines = {m: next(x for x in text.splitlines() if x.startswith(f"- **{m}**")) for m in win.model}
    for r in win.itertuples():  # with the fitted size that missed the threshold, where a fit was made
        if not pd.notna(r.icl_window_start_tokens):
            fall = (f"; its fitted fall {r.icl_window_rise:.2f} nats{_pval(r.icl_window_p_value)}"
                    if pd.notna(r.icl_window_fit_rms) else "")
            assert (f"from 0.5M tokens on, at least 5, has no fall of the ICL score of at least {MIN_ICL_DROP} nats, "
                    f"significant against the trend alone (F-test, p < {WINDOW_P}), whose 10% point lies inside "
                    f"them{fall})") in lines[r.model]
        if not pd.notna(r.induction_window_start_tokens):
            rise = (f"; its fitted rise {r.induction_window_rise:.2f}{_pval(r.induction_window_p_value)}"
                    if pd.notna(r.induction_window_fit_rms) else "")
            assert f"score of at least {MIN_INDUCTION_RISE}, significant at p < {WINDOW_P}{rise})" in lines[r.model]
    one = win[win.bump & (win.bump_start_tokens == win.bump_end_tokens)]
    assert len(one) and text.count("(one checkpoint)") == len(one)
    assert "(paired, 64 windows; " in text
    sets = pd.read_csv(out / "ablations_attn-2l" / "sets.csv")
    rnd = sets[sets.group == "random (non-induction)"]
    size = sets[sets.group == "induction heads"].n_heads.iloc[0]
    n_others = sets[sets.group == "all other heads"].n_heads.iloc[0]
    possible = math.comb(n_others, size)
    assert len(rnd) == rnd.heads.nunique() == min(6, possible) and (rnd.n_heads == size).all()
    what = "single head" if size == 1 else f"set of {size} heads" if len(rnd) == 1 else f"sets of {size} heads"
    assert f"Random control, {len(rnd)} distinct {what}" in text
    assert f"from the {n_others} non-induction heads" in text
    assert len(rnd) > 1 or "one distinct set: no spread over sets" in text


def test_rerun_skips_and_corruption_is_detected(tiny_run):  # last: it corrupts a shared table
    """A re-run skips finished work and leaves tables unchanged; a truncated table is detected with a
    message naming the file to delete."""
    out, _ = tiny_run
    before = (out / "phase_change" / "checkpoints.csv").read_bytes()
    reproduce(out=out, scale="tiny", progress=False, figures_dir=out / "figures")
    assert (out / "phase_change" / "checkpoints.csv").read_bytes() == before
    path = out / "ablations_attn-2l" / "sets.csv"
    path.write_text(path.read_text()[:50])
    with pytest.raises(ResultError, match="delete"):
        Results(out, "ablations_attn-2l").read("sets")
