"""What causes the early positive ICL score: per checkpoint (0.2M-9M tokens) of the given runs, the ICL
score, the loss of the early and late bands, and each layer's attention entropy (fraction of uniform)
and attention on the previous token at the early and late query positions of
``experiments.phase_change.transient_bands`` (18-28 and 243-253 at context 256: those that predict the
ICL score's own bands).

    python benchmarks/transient_probe.py RUN [RUN ...] OUT.csv
"""
import sys, torch, pandas as pd
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from experiments.phase_change import attention_by_band, eval_windows, icl_row, run_config, step_tokens, window_losses
from interventions.zoo.train import list_checkpoints, load_model
rows = []
for run in sys.argv[1:-1]:
    cfg = run_config(run); wins = eval_windows(cfg, 256)
    for c in list_checkpoints(run):
        step, tok = step_tokens(c, cfg)
        if not 0.2e6 <= tok <= 9e6: continue
        m = load_model(c)
        icl = icl_row(window_losses(m, wins))
        g = attention_by_band(m, wins[:64])
        rows.append({"run": run[-6:], "tokens_M": round(tok / 1e6, 2), "icl": round(icl["icl_score"], 3),
                     "loss_early": round(icl["icl_early"], 3), "loss_late": round(icl["icl_late"], 3),
                     **{f"L{r.layer}_{r.band}_entfrac": round(r.entropy / r.uniform_entropy, 2) for r in g.itertuples()},
                     **{f"L{r.layer}_{r.band}_prev": round(r.prev_token_attention, 3) for r in g.itertuples()}})
        print(rows[-1], flush=True)
pd.DataFrame(rows).to_csv(sys.argv[-1], index=False)
