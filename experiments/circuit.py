"""Circuit by patching: locate the previous-token head -> induction head circuit.

Prompts: random tokens of length L repeated twice (clean); the corrupted prompt replaces the first
copy with other random tokens, so nothing earlier in context predicts the second copy. Metric: mean
loss (nats) on the second copy. Each head's output is patched from the clean run into the corrupted
run (by head, and by head x position), and the fraction of the clean-vs-corrupted loss gap it
restores is recorded.

K-composition evidence: on the clean prompt, the previous-token head (the layer-0 head with the
highest previous-token score) is zero-ablated, while the induction head's (layer-1) queries, or its
keys, or its values are restored to their clean values. If the induction head reads the previous-token
head through its keys, restoring only the keys recovers most of the loss, and restoring queries or values
recovers little.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from interventions.engine.adapters import get_adapter
from interventions.primitives.loss import loss_from_logits
from interventions.zoo.train import RunFolderError, TrainConfig, list_checkpoints, load_model, load_train_config

from .common import Results, owns_results, run_fingerprint


def repeated_prompts(vocab_size: int, length: int, n: int, seed: int, low: int = 0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(low, vocab_size, (n, length), generator=g)
    other = torch.randint(low, vocab_size, (n, length), generator=g)
    return torch.cat([seg, seg], 1), torch.cat([other, seg], 1)


def second_copy_loss(length: int):
    def metric(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return loss_from_logits(logits, tokens)[:, length:].mean(-1)  # (batch,)
    return metric


@torch.no_grad()
def k_composition(model, clean: torch.Tensor, prev_head: tuple[int, int], ind_layer: int, length: int) -> dict:
    """Second-copy loss with the previous-token head ablated, restoring the later layer's q, k or v.

    Plain torch hooks (a pre-hook zeroes the head's slice of the o_proj input; forward hooks put back
    the clean projection outputs), so this check shares no code with the nnsight primitives."""
    a = get_adapter(model)
    if a.model_type != "attn_only":
        raise ValueError("K-composition needs separate q/k/v projections (our attention-only model)")
    layer0, head0 = prev_head
    sl = a.head_slice(head0)
    attn = a.module(model, ind_layer, "attn")
    projs = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")}
    cached: dict = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: cached.__setitem__(n, o.clone()))
               for n, m in projs.items()]
    clean_loss = loss_from_logits(model(clean).logits, clean)[:, length:].mean().item()
    for h in handles:
        h.remove()

    def zero_head(mod, args):
        z = args[0].clone()
        z[:, :, sl] = 0
        return (z,)

    out = {"clean": clean_loss}
    for restore in ("none", "q_proj", "k_proj", "v_proj"):
        handles = [a.module(model, layer0, "o_proj").register_forward_pre_hook(zero_head)]
        if restore != "none":
            handles.append(projs[restore].register_forward_hook(lambda mod, i, o, n=restore: cached[n]))
        try:
            out[restore] = loss_from_logits(model(clean).logits, clean)[:, length:].mean().item()
        finally:
            for h in handles:
                h.remove()
    return out


@owns_results()
def run_circuit(run: Path, name: str, head_scores: pd.DataFrame, results_root: Path, n_prompts: int = 16,
                device: str = "cpu") -> Results:
    from interventions.primitives.patching import patch_heads

    res = Results(results_root, f"circuit_{name}")
    key = {"run": run_fingerprint(run), "n_prompts": n_prompts}  # recomputed when the run changes
    if res.has_all(["patch_heads", "patch_head_pos", "k_composition"], key):
        return res
    cfg = load_train_config(run)
    if not list_checkpoints(run):
        raise RunFolderError(f"{run} has no complete checkpoint: train it first, or resume it with `train --resume`")
    model = load_model(list_checkpoints(run)[-1], device)
    a = get_adapter(model)
    length = min(50, (cfg.n_ctx - 1) // 2)
    text = not cfg.corpus.startswith("synthetic:")
    clean, corrupted = repeated_prompts(min(a.vocab_size, 127) if text else a.vocab_size, length, n_prompts,
                                        cfg.seed, low=32 if text else 0)
    metric_c = second_copy_loss(length)
    res.write_provenance({"run": str(run), "n_prompts": n_prompts, "length": length}, seed=cfg.seed)

    base_clean = metric_c(model(clean).logits, clean).mean().item()
    base_corr = metric_c(model(corrupted).logits, corrupted).mean().item()  # same second copy in both prompts
    by_head = patch_heads(model, clean, corrupted, metric_c, by="head")  # (layer, head)
    by_pos = patch_heads(model, clean, corrupted, metric_c, by="head_pos")  # (layer, head, pos)
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
        hs = head_scores[(head_scores.model == name)]
        final = hs[hs.step == hs.step.max()]
        prev = final[(final.score == "previous_token") & (final.layer == 0)].sort_values("value").iloc[-1]
        ind = final[(final.score == "induction") & (final.layer > 0)].sort_values("value").iloc[-1]
        kc = k_composition(model, clean, (int(prev["layer"]), int(prev["head"])), int(ind["layer"]), length)
        res.write("k_composition", pd.DataFrame([{"model": name, "previous_token_head": f"L{int(prev['layer'])}H{int(prev['head'])}",
                                                   "induction_layer": int(ind.layer), "restored": k, "loss": v}
                                                  for k, v in kc.items()]), inputs=key)
    else:
        res.write("k_composition", pd.DataFrame(columns=["model", "previous_token_head", "induction_layer",
                                                         "restored", "loss"]), inputs=key)
    return res
