"""The induction mosaic: induction score of every head for a list of models (one heatmap each).

Models are hub names (for users online, e.g. ``gpt2``, ``EleutherAI/pythia-70m``), local model
folders, or runs of our zoo (their final checkpoint). Table ``survey/induction_scores``: one row per
model x layer x head.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .common import Results


def load_any(spec: str, device: str = "cpu"):
    """A model from a run folder, a checkpoint/model folder, or a hub name (needs the network)."""
    from interventions.zoo.train import latest_checkpoint, load_model

    p = Path(spec)
    if (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise ValueError(f"run {spec} has no complete checkpoint: train it first")
        return load_model(ckpt, device)
    if (p / "config.json").is_file():
        return load_model(p, device)
    if p.exists():
        raise ValueError(f"{spec} is neither a run folder nor a model folder (no config.json)")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(spec, attn_implementation="eager").to(device).eval()
    except OSError as e:
        raise ValueError(f"could not load {spec!r} from the hub ({e}); offline, pass a local folder") from None


def _table(label: str) -> str:
    """Table name of one model's scores (a hub name like ``EleutherAI/pythia-70m`` made file-safe)."""
    return "induction_" + "".join(c if c.isalnum() else "_" for c in label)


def run_survey(models: dict[str, str], results_root: Path, seq_len: int = 50, n_examples: int = 10,
               device: str = "cpu") -> Results:
    from interventions.analysis import scores

    res = Results(results_root, "survey")
    res.write_provenance({"models": models, "seq_len": seq_len, "n_examples": n_examples})
    for label, spec in models.items():
        table = _table(label)
        if res.has(table):
            continue
        model = load_any(spec, device)
        from .phase_change import probe_kwargs

        kw = probe_kwargs(model)
        kw.pop("prefix_tokens")
        kw["seq_len"] = min(seq_len, kw["seq_len"])
        df = scores.induction_score(model, n_examples=n_examples, **kw)
        res.write(table, df.assign(model=label))
    res.write("induction_scores", pd.concat([res.read(_table(label)) for label in models]))
    return res
