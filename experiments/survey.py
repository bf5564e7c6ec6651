"""The induction mosaic: induction score of every head for a list of models (one heatmap each).

Models are hub names (for users online, e.g. ``gpt2``, ``EleutherAI/pythia-70m``), local model
folders, or runs of our zoo (their final checkpoint). Table ``survey/induction_scores``: one row per
model x layer x head.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .common import InputError, Results, model_fingerprint, owns_results


def model_labels(specs: list[str]) -> dict[str, str]:
    """label -> spec: a folder's basename, or its whole path where two folders share a basename."""
    names = [Path(s).name if Path(s).exists() else s for s in specs]
    return {(n if names.count(n) == 1 else s): s for n, s in zip(names, specs)}


def load_any(spec: str, device: str = "cpu", allow_pickle: bool = False):
    """A model from a run folder, a checkpoint/model folder, or a hub name (needs the network).

    Hub weights load only from safetensors unless ``allow_pickle`` (unpickling can run code)."""
    from interventions.zoo.train import latest_checkpoint, load_model

    p = Path(spec)
    if (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise InputError(f"run {spec} has no complete checkpoint: train it first")
        return load_model(ckpt, device)
    if (p / "config.json").is_file():
        return load_model(p, device)
    if p.exists():
        raise InputError(f"{spec} is neither a run folder nor a model folder (no config.json)")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(spec, attn_implementation="eager",
                                                    use_safetensors=not allow_pickle).to(device).eval()
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not allow_pickle and "safetensors" in str(e):
            raise InputError(f"{spec!r} has no safetensors weights on the hub ({first}); pickle weights are not "
                             "loaded by default (unpickling can run code): pass --allow-pickle "
                             "(load_any(..., allow_pickle=True)) if you trust it") from None
        raise InputError(f"could not load {spec!r} from the hub ({first}); offline, pass a local folder") from None


def _table(label: str) -> str:
    """Table name of one model's scores (a hub name like ``EleutherAI/pythia-70m`` made file-safe)."""
    return "induction_" + "".join(c if c.isalnum() else "_" for c in label)


@owns_results()
def run_survey(models: dict[str, str], results_root: Path, seq_len: int = 50, n_examples: int = 10,
               device: str = "cpu", allow_pickle: bool = False) -> Results:
    from interventions.analysis import scores

    res = Results(results_root, "survey")
    # settings shared by every table; each model's table is keyed on its content hash (models can be added)
    res.write_provenance({"seq_len": seq_len, "n_examples": n_examples}, models=models)
    for label, spec in models.items():
        table = _table(label)
        local = Path(spec).exists()
        key = {"model": model_fingerprint(spec) if local else None, "seq_len": seq_len, "n_examples": n_examples}
        if local and res.has(table, key):  # cached by content hash: a re-saved model is re-scored
            continue
        model = load_any(spec, device, allow_pickle)
        key["model"] = key["model"] or model_fingerprint(spec, model)
        if res.has(table, key):
            continue
        from .phase_change import probe_kwargs

        kw = probe_kwargs(model)
        kw.pop("prefix_tokens")
        kw["seq_len"] = min(seq_len, kw["seq_len"])
        df = scores.induction_score(model, n_examples=n_examples, **kw)
        res.write(table, df.assign(model=label), inputs=key)
    res.write("induction_scores", pd.concat([res.read(_table(label)) for label in models]))
    return res
