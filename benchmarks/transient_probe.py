"""What causes the early positive ICL score: per checkpoint (0.2M-9M tokens) of the given runs, the ICL
score, the loss of the early and late bands, and each layer's attention entropy (fraction of uniform)
and attention on the previous token at early (< 30) and late (>= 245) query positions.

    python benchmarks/transient_probe.py RUN [RUN ...] OUT.csv
"""
import sys, torch, pandas as pd, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from experiments.phase_change import eval_windows, run_config, step_tokens, window_losses, icl_row, attention_entropy
from interventions.zoo.train import list_checkpoints, load_model
rows = []
for run in sys.argv[1:-1]:
    cfg = run_config(run); wins = eval_windows(cfg, 256)
    for c in list_checkpoints(run):
        step, tok = step_tokens(c, cfg)
        if not 0.2e6 <= tok <= 9e6: continue
        m = load_model(c)
        icl = icl_row(window_losses(m, wins))
        ent = attention_entropy(m, wins[:64])
        e = ent.assign(band=np.where(ent.position < 30, "early", np.where(ent.position >= 245, "late", "mid")))
        g = e[e.band != "mid"].groupby(["layer", "band"]).agg(ent=("entropy", "mean"), uni=("uniform_entropy", "mean"), prev=("prev_token_attention", "mean"))
        rows.append({"run": run[-6:], "tokens_M": round(tok / 1e6, 2), "icl": round(icl["icl_score"], 3),
                     "loss_early": round(icl["icl_early"], 3), "loss_late": round(icl["icl_late"], 3),
                     **{f"L{l}_{b}_entfrac": round(r.ent / r.uni, 2) for (l, b), r in g.iterrows()},
                     **{f"L{l}_{b}_prev": round(r.prev, 3) for (l, b), r in g.iterrows()}})
        print(rows[-1], flush=True)
pd.DataFrame(rows).to_csv(sys.argv[-1], index=False)
