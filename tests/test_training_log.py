"""The phase change read from the trainer's log: windows and thresholds of planted curves."""

import json
import math

import numpy as np
import pytest

from experiments.training_log import main, spread, training_curves, training_windows


def _planted_run(folder, seed, center, width=0.08, gap_rise=1.2, icl_rise=0.4):
    """A run folder whose log holds logistic rises (in log10 tokens) of the repeat gap and of -ICL."""
    folder.mkdir(parents=True)
    (folder / "train_config.json").write_text(json.dumps({"seed": seed}))
    tokens = np.unique(np.geomspace(1e5, 3e7, 120).astype(int))
    s = 1 / (1 + np.exp(-(np.log10(tokens) - center) / width))
    with open(folder / "metrics.jsonl", "w") as f:
        for i, (t, si) in enumerate(zip(tokens, s)):
            f.write(json.dumps({"step": i, "tokens": int(t), "train_loss": 3.0, "lr": 2e-3, "val_loss": 3.0,
                                "icl_score": -icl_rise * si, "repeat_loss_first": 5.0,
                                "repeat_loss_second": 5.0 - gap_rise * si}) + "\n")
    return tokens


def test_windows_and_thresholds_match_the_planted_rise(tmp_path):
    centers = {0: 7.0, 1: 7.2}
    runs = {f"attn-2l-s{k}": tmp_path / f"attn-2l-s{k}" for k in centers}
    tokens = {k: _planted_run(runs[f"attn-2l-s{k}"], k, c) for k, c in centers.items()}
    w = training_windows(training_curves(runs)).set_index("run")
    for k, c in centers.items():
        r = w.loc[f"attn-2l-s{k}"]
        for col in ("icl_window", "gap_window"):  # 10% and 90% of the rise: c -+ width ln 9 (in log10 tokens)
            assert math.log10(r[f"{col}_start_tokens"]) == pytest.approx(c - 0.08 * math.log(9), abs=1e-3)
            assert math.log10(r[f"{col}_end_tokens"]) == pytest.approx(c + 0.08 * math.log(9), abs=1e-3)
        # gap >= 0.3 first where 1.2 * sigmoid >= 0.3, i.e. log10 t >= c - width ln 3 (next checkpoint)
        t = tokens[k]
        assert r["gap_0.3_tokens"] == t[np.log10(t) >= c - 0.08 * math.log(3)][0]
        assert r["gap_1.0_tokens"] == t[np.log10(t) >= c + 0.08 * math.log(5)][0]
        assert r["final_icl"] == pytest.approx(-0.4 / (1 + math.exp(-(math.log10(t[-1]) - c) / 0.08)))
    sp = spread(w.reset_index())["attn-2l"]
    starts = [w.loc[f"attn-2l-s{k}", "gap_window_start_tokens"] for k in centers]
    assert sp["gap_window_start_tokens"]["mean"] == pytest.approx(np.mean(starts))
    # seed 1's 90% point (10^7.38) is followed by less than half the window's width (0.18 decades) of run
    assert sp["gap_window_ends_inside"] == {"true": 1, "n": 2}


def test_cli_writes_tables_spread_and_figure(tmp_path):
    runs = [tmp_path / "runs" / f"smear-1l-s{k}" for k in (0, 1)]
    for k, r in enumerate(runs):
        _planted_run(r, k, 6.3 + 0.1 * k)
    out = tmp_path / "out"
    assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    for name in ("training_curves.csv", "training_windows.csv", "seed_spread.json", "training_log.png",
                 "training_log.pdf", "provenance.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "seed_spread.json").read_text())["smear-1l"]["seeds"] == 2
    prov = json.loads((out / "provenance.json").read_text())  # the tables say which runs' logs made them
    assert prov["config"]["runs"] == {r.name: str(r) for r in runs} and set(prov["metrics_sha256"]) == {r.name for r in runs}
    assert {"git", "versions", "created"} <= set(prov)


def test_spread_counts_a_run_named_without_its_seed(tmp_path):
    """The main job's run folder ``attn-2l`` (seed 0 from its config) with ``attn-2l-s1`` and ``-s2``: the
    spread is over all three seeds, as the curves and the figure are, not over the two suffixed ones."""
    runs = {"attn-2l": tmp_path / "attn-2l", "attn-2l-s1": tmp_path / "attn-2l-s1", "attn-2l-s2": tmp_path / "attn-2l-s2"}
    for (name, folder), c in zip(runs.items(), (7.0, 7.1, 7.2)):
        _planted_run(folder, int(name[-1]) if name.endswith(("s1", "s2")) else 0, c)
    w = training_windows(training_curves(runs))
    assert sorted(w.seed) == [0, 1, 2]
    sp = spread(w)["attn-2l"]
    assert sp["seeds"] == 3
    assert sp["final_icl"]["mean"] == pytest.approx(w.final_icl.mean())


def test_cli_refuses_two_runs_of_one_name(tmp_path):
    """Two run folders with the same basename (and so one table row each, by name) are refused with exit
    code 2 naming them, not silently reduced to one; nothing is written."""
    runs = [tmp_path / d / "attn-2l" for d in ("a", "b")]
    for k, r in enumerate(runs):
        _planted_run(r, k, 7.0)
    with pytest.raises(SystemExit) as e:
        main([str(r) for r in runs] + ["--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert not (tmp_path / "out").exists()


def test_cli_refuses_two_runs_of_one_seed_and_a_missing_run(tmp_path, capsys):
    """``attn-2l`` (seed 0 in its config) with ``attn-2l-s0``: two runs of one seed, and a folder that is no
    run: exit 2 naming the problem, no traceback, nothing written (the tables were written before the
    duplicate seed raised a ValueError)."""
    runs = [tmp_path / "attn-2l", tmp_path / "attn-2l-s0"]
    for r in runs:
        _planted_run(r, 0, 7.0)
    for argv, message in (([str(r) for r in runs], "two runs of attn-2l with seed 0"),
                          ([str(tmp_path / "missing")], "is not a training run folder")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "out")])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys):
    """``--out`` an existing file: exit 2 naming it (it raised FileExistsError with a traceback), nothing
    written."""
    _planted_run(tmp_path / "attn-2l", 0, 7.0)
    (tmp_path / "out").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "attn-2l"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "mine"


def test_cli_names_a_run_given_as_dot_by_its_folder(tmp_path, monkeypatch):
    """`python -m experiments.training_log .` inside a run folder: the run was named "" (``Path(".").name``), so
    its tables had an empty run and model; it is named by its folder, as phase-change and survey name it."""
    import pandas as pd

    run = tmp_path / "attn-2l-s1"
    _planted_run(run, 1, 7.0)
    monkeypatch.chdir(run)
    assert main([".", "--out", str(tmp_path / "out")]) == 0
    w = pd.read_csv(tmp_path / "out" / "training_windows.csv")
    assert w.run.tolist() == ["attn-2l-s1"] and w.model.tolist() == ["attn-2l"]
