"""The circuit experiment's path patching (experiments/circuit.py) on the hand-built two-layer induction
circuit of tests/test_scores.py, whose induction head L1H0 reads the previous-token head L0H0 through
its keys only: the experiment's table must show K-composition and nothing through Q or V."""

import math

import pandas as pd
import pytest
import torch

from experiments.circuit import circuit_heads, path_patch_table
from interventions.primitives.patching import second_copy_loss
from interventions import path_patch
from interventions.analysis.scores import probe_sequences
from interventions.engine.heads import Head

from .test_scores import BOS, POOL, circuit_model

L = 20


def _prompts(n=4):
    model = circuit_model(2)
    clean = probe_sequences(model, L, n, 0, bos_id=BOS, token_pool=POOL)
    resampled = probe_sequences(model, L, n, 1, bos_id=BOS, token_pool=POOL)
    return model, clean, resampled


def test_path_patch_table_shows_k_composition():
    """Resampling L0H0's output on its path into L1H0's keys raises the second-copy loss by > 1 nat;
    the same into its queries or values changes it by < 1% of that; L0H1 (no output) and the receiver
    L1H1 (reads no previous-token information) show nothing; s.e. over prompts is finite."""
    model, clean, resampled = _prompts()
    df = path_patch_table(model, clean, resampled, L, [Head(0, 0), Head(0, 1)], [Head(1, 0), Head(1, 1)])
    assert len(df) == 2 * 2 * 3 and set(df.receiver_input) == {"q", "k", "v"}
    eff = df.set_index(["sender", "receiver", "receiver_input"]).effect
    k = eff["L0H0", "L1H0", "k"]
    assert k > 1.0
    assert abs(eff["L0H0", "L1H0", "q"]) < 0.01 * k and abs(eff["L0H0", "L1H0", "v"]) < 0.01 * k
    rest = eff.drop(("L0H0", "L1H0", "k"))
    assert rest.abs().max() < 1e-4
    assert all(math.isfinite(x) for x in df.se) and (df.n_prompts == clean.shape[0]).all()


def test_patching_into_the_unrepeated_prompt_restores_nothing():
    """Why the experiment resamples the sender on the clean prompt: patching L0H0's clean output into
    L1H0's keys on the unrepeated prompt (first copy replaced) points the head at the right positions,
    but their values hold the replaced tokens, so less than 10% of the loss gap is restored."""
    model, clean, resampled = _prompts()
    unrepeated = torch.cat([clean[:, :1], resampled[:, 1:L + 1], clean[:, L + 1:]], dim=1)
    metric = second_copy_loss(L)
    with torch.no_grad():
        c = metric(model(clean).logits, clean).mean()
        u = metric(model(unrepeated).logits, unrepeated).mean()
    assert u - c > 5.0
    got = path_patch(model, clean, unrepeated, metric, ["L0H0"], ["L1H0"], receiver_input="k")[0, 0]
    assert (u - got) / (u - c) < 0.1


def test_previous_token_head_needs_the_previous_token_score():
    """The sender labelled the previous-token head is the one with the highest previous-token score;
    scores without that column are refused (it silently took the highest prefix-matching score, an
    induction-like head, and labelled it the previous-token head)."""
    scores = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "induction": [0.0, 0.1, 0.9, 0.2],
                           "prefix_matching": [0.0, 0.8, 0.9, 0.2], "is_induction": [False, False, True, False]})
    with_prev = scores.assign(previous_token=[0.9, 0.1, 0.0, 0.0])
    senders, receivers, prev, induction = circuit_heads(with_prev, 2, 2)
    assert (prev, induction) == (Head(0, 0), Head(1, 0)) and senders == [Head(0, 0), Head(0, 1)]
    with pytest.raises(ValueError, match="previous_token"):
        circuit_heads(scores, 2, 2)
