"""Circuit by patching: locate the previous-token head -> induction head circuit.

Prompts (the library's probe sequences, ``interventions.analysis.scores.probe_sequences``, with the
experiments' probe settings ``probe_kwargs``): BOS + L distinct random tokens repeated twice (clean).
Metric: mean loss (nats) on the second copy, from its second token on (the first has nothing to
induct from): the library's ``second_copy_loss(L)``.

1. **Activation patching** (tables ``patch_heads``, ``patch_head_pos``). The *unrepeated* prompt
   replaces the first copy with other random tokens, so nothing earlier predicts the second copy.
   Each head's output is patched from the clean run into the unrepeated run (by head, and by head x
   position); ``restored`` is the fraction of the unrepeated-vs-clean loss gap it closes.

2. **Path patching** (table ``path_patch``; Wang et al. 2022, Goldowsky-Dill et al. 2023): the
   effect of each sender head (the layers below the induction head's) on each receiver head (the
   induction head's layer) through the receiver's queries, keys or values *only*, every other path
   frozen. The paper's claim is K-composition: the induction head's keys read the previous-token
   head; Q and V are the controls.

   The corruption, and why. Path patching *into the unrepeated prompt* (patch clean -> unrepeated)
   restores almost nothing even for the K path: the restored keys point the induction head at the
   right first-copy positions, but the values there carry the unrepeated prompt's tokens, so it
   copies the wrong ones. A corruption for this question must keep the tokens (values, and the token
   the induction head copies, intact) and change only what the sender sends. So the run measured is
   the *clean* prompt, and the sender's output on the path is a **resample**: its output on another
   prompt of the same distribution (another BOS + L distinct random tokens repeated twice, drawn
   with another seed), i.e. ``path_patch(..., direction="corrupted_to_clean")`` with that prompt as
   the corrupted one. This is a resample ablation of one path (Goldowsky-Dill et al.'s causal
   scrubbing; Wang et al. patch from a reference distribution the same way). Each of q, k, v receives
   the sender's resampled output at *every* position (not only at the first copy), so the three
   controls get equally corrupted inputs; a head that reads its sender through one input only is
   damaged through that input only.

   ``effect`` = second-copy loss with that one path resampled minus the clean loss (nats; positive:
   the path carries what induction needs), mean over prompts with its standard error over prompts
   (``path_patch(..., reduce=False)``); ``share`` = effect / (unrepeated loss - clean loss), the fraction of
   the induction benefit the path carries. ``sender_is_previous_token`` and ``receiver_is_induction`` mark
   *the* previous-token head and *the* induction head the table is about (``circuit_heads``: the sender with
   the highest previous-token score, the receiver with the highest induction score among the heads the rule
   classifies), so another head the rule also calls an induction head is False there.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from interventions.analysis.scores import classify_induction_heads, probe_sequences
from interventions.engine.adapters import get_adapter
from interventions.engine.heads import Head
from interventions.primitives.patching import path_patch, second_copy_loss
from interventions.zoo.train import RunFolderError, list_checkpoints, load_model, load_train_config

from .common import Results, owns_results, run_fingerprint, run_setting
from .phase_change import probe_kwargs

RECEIVER_INPUTS = ("q", "k", "v")
PATH_COLUMNS = ["model", "sender", "receiver", "receiver_input", "effect", "se", "share", "n_prompts",
                "clean_loss", "unrepeated_loss", "sender_is_previous_token", "receiver_is_induction"]
METHOD = "path patching, resampled sender (v2)"  # part of the tables' inputs: older tables are recomputed


def circuit_prompts(model, n_prompts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(clean, unrepeated, resampled, L): three (n_prompts, 1 + 2L) prompts, each BOS + L distinct random
    probe tokens twice; ``unrepeated`` is ``clean`` with its first copy replaced by ``resampled``'s."""
    kw = probe_kwargs(model)
    length = kw.pop("seq_len")
    kw.pop("prefix_tokens")
    clean = probe_sequences(model, length, n_prompts, seed, **kw)
    resampled = probe_sequences(model, length, n_prompts, seed + 1, **kw)
    unrepeated = torch.cat([clean[:, :1], resampled[:, 1:length + 1], clean[:, length + 1:]], dim=1)
    return clean, unrepeated, resampled, length


@torch.no_grad()
def path_patch_table(model, clean: torch.Tensor, resampled: torch.Tensor, length: int, senders: list[Head],
                     receivers: list[Head]) -> pd.DataFrame:
    """Effect of each sender -> receiver q/k/v path (module docstring): one row per (sender, receiver,
    receiver_input) with columns sender, receiver, receiver_input, effect, se (nats), n_prompts.

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
        >>> t = torch.randint(1, 20, (2, 9))
        >>> df = path_patch_table(model, t, t.flip(0), 4, [Head(0, 0)], [Head(1, 0), Head(1, 1)])
        >>> len(df), list(df.columns[:4])
        (6, ['sender', 'receiver', 'receiver_input', 'effect'])
    """
    metric = second_copy_loss(length)
    base = metric(model(clean).logits, clean).cpu()  # (n,)
    rows = []
    for kind in RECEIVER_INPUTS:
        # each prompt's path patch, so the effect has a standard error over prompts (the same numbers, bit for
        # bit, as one call per prompt on the default run's model and prompts)
        per = path_patch(model, clean, resampled, metric, senders, receivers, receiver_input=kind,
                         direction="corrupted_to_clean", progress=False, reduce=False)  # (senders, receivers, n)
        per = per.permute(2, 0, 1)  # (n, senders, receivers)
        eff = (per - base[:, None, None]).double()
        n = eff.shape[0]
        se = eff.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full(eff.shape[1:], float("nan"))
        for i, s in enumerate(senders):
            for j, r in enumerate(receivers):
                rows.append({"sender": str(s), "receiver": str(r), "receiver_input": kind,
                             "effect": eff[:, i, j].mean().item(), "se": se[i, j].item(), "n_prompts": n})
    return pd.DataFrame(rows)


def _final_scores(head_scores: pd.DataFrame, name: str) -> pd.DataFrame:
    """The final checkpoint's head scores of ``name``, wide (one row per head), classified by the
    library's one induction-head rule."""
    hs = head_scores[head_scores.model == name]
    final = hs[hs.step == hs.step.max()]
    wide = final.pivot_table(index=["layer", "head"], columns="score", values="value").reset_index()
    return classify_induction_heads(wide)


def chosen_heads(head_scores: pd.DataFrame, name: str) -> list[str] | None:
    """[previous-token head, induction head] that ``circuit_heads`` takes from ``name``'s final head scores, None
    where it takes none (one layer)."""
    scores = _final_scores(head_scores, name)
    if scores.empty or scores.layer.max() < 1 or "previous_token" not in scores.columns:
        return None
    _, _, prev, induction = circuit_heads(scores, int(scores.layer.max()) + 1, int(scores["head"].max()) + 1)
    return [str(prev), str(induction)]


def circuit_heads(scores: pd.DataFrame, n_layers: int, n_heads: int) -> tuple[list[Head], list[Head], Head, Head]:
    """Senders (every head below the receivers' layer), receivers (every head of the layer of the
    strongest induction head: by the rule, else by induction score above layer 0), the previous-token
    head (highest previous-token score among the senders) and the induction head."""
    above = scores[scores.layer > 0]
    pool = above[above.is_induction] if above.is_induction.any() else above
    top = pool.sort_values("induction").iloc[-1]
    induction = Head(int(top["layer"]), int(top["head"]))
    senders = [Head(layer, h) for layer in range(induction.layer) for h in range(n_heads)]
    receivers = [Head(induction.layer, h) for h in range(n_heads)]
    if "previous_token" not in scores.columns:  # prefix matching would pick an induction-like head instead
        raise ValueError("the head scores have no previous_token score, needed to name the previous-token head: "
                         "compute them with windows of text (head_scores(model, windows=...))")
    below = scores[scores.layer < induction.layer]
    prev = below.sort_values("previous_token").iloc[-1]
    return senders, receivers, Head(int(prev["layer"]), int(prev["head"])), induction


@owns_results()
def run_circuit(run: Path, name: str, head_scores: pd.DataFrame, results_root: Path, n_prompts: int = 16,
                device: str = "cpu") -> Results:
    from interventions.primitives.patching import patch_heads

    res = Results(results_root, f"circuit_{name}")
    key = {"run": run_fingerprint(run), "n_prompts": n_prompts, "method": METHOD}  # recomputed when these change
    heads = chosen_heads(head_scores, name)
    if heads is not None:  # and when the head scores name another previous-token or induction head (the path
        key["heads"] = heads  # patching's senders, receivers and labels: scores of other windows may)
    if res.has_all(["patch_heads", "patch_head_pos", "path_patch"], key):
        return res
    cfg = load_train_config(run)
    if not list_checkpoints(run):
        raise RunFolderError(f"{run} has no complete checkpoint: train it first, or resume it with `train --resume`")
    model = load_model(list_checkpoints(run)[-1], device)
    a = get_adapter(model)
    clean, unrepeated, resampled, length = circuit_prompts(model, n_prompts, cfg.seed)
    clean, unrepeated, resampled = clean.to(device), unrepeated.to(device), resampled.to(device)
    metric = second_copy_loss(length)
    res.write_provenance({"run": run_setting(res, run), "n_prompts": n_prompts, "length": length}, seed=cfg.seed)

    with torch.no_grad():
        base_clean = metric(model(clean).logits, clean).mean().item()
        base_corr = metric(model(unrepeated).logits, unrepeated).mean().item()  # same second copy in both
    by_head = patch_heads(model, clean, unrepeated, metric, by="head")  # (layer, head)
    by_pos = patch_heads(model, clean, unrepeated, metric, by="head_pos")  # (layer, head, pos)
    gap = base_corr - base_clean
    rows = [{"layer": layer, "head": h, "head_name": f"L{layer}H{h}", "loss": by_head[layer, h].item(),
             "restored": (base_corr - by_head[layer, h].item()) / gap if gap else float("nan")}
            for layer in range(a.n_layers) for h in range(a.n_heads)]
    res.write("patch_heads", pd.DataFrame(rows).assign(model=name, clean_loss=base_clean, corrupted_loss=base_corr),
              inputs=key)
    rows = [{"layer": layer, "head": h, "head_name": f"L{layer}H{h}", "position": p, "loss": by_pos[layer, h, p].item(),
             "restored": (base_corr - by_pos[layer, h, p].item()) / gap if gap else float("nan")}
            for layer in range(a.n_layers) for h in range(a.n_heads) for p in range(by_pos.shape[-1])]
    res.write("patch_head_pos", pd.DataFrame(rows).assign(model=name), inputs=key)
    if a.n_layers >= 2:
        scores = _final_scores(head_scores, name)
        senders, receivers, prev, induction = circuit_heads(scores, a.n_layers, a.n_heads)
        df = path_patch_table(model, clean, resampled, length, senders, receivers)
        df = df.assign(model=name, clean_loss=base_clean, unrepeated_loss=base_corr,
                       share=df.effect / gap if gap else float("nan"),
                       sender_is_previous_token=df.sender == str(prev),
                       receiver_is_induction=df.receiver == str(induction))
        res.write("path_patch", df[PATH_COLUMNS], inputs=key)
    else:
        res.write("path_patch", pd.DataFrame(columns=PATH_COLUMNS), inputs=key)
    return res
