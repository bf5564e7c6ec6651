"""The induction mosaic: induction score of every head for a list of models (one heatmap each).

Models are hub names (for users online, e.g. ``gpt2``, ``EleutherAI/pythia-70m``, pinned to a
revision with ``name@revision``), local model folders, or runs of our zoo (their final checkpoint).
Table ``survey/induction_scores``: one row per model x layer x head.

A survey scales to many models:

* one model at a time: each is loaded, scored and released (no reference kept; the garbage
  collector and the CUDA cache are emptied) before the next is loaded;
* every model's table is written atomically the moment it is scored, keyed on the model's
  identity: the hub name and the commit its revision resolves to (read from the hub's ``config.json``,
  no weights downloaded), or the content hash of a local model (``common.model_fingerprint``: its
  files and the tokenizer beside it), and the device the scores were computed on (scores differ
  slightly by device). An interrupted survey rerun with the same command skips every finished model
  without loading it; a model whose weights or tokenizer changed, or a rerun with another ``--device``,
  is scored again;
* every model is checked (exists, resolves on the hub, has a supported architecture; a folder's
  safetensors weights are present and readable) before any is loaded;
* ``remote=True`` is refused (``InputError``, before any work) while the induction score needs
  attention patterns (``observable()`` edits the model; a server's model is shared); it is passed
  through to a scorer that takes ``remote=``.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import weakref
from pathlib import Path

import pandas as pd

from .common import InputError, Results, model_fingerprint, owns_results
from .naming import folder_name


def model_labels(specs: list[str]) -> dict[str, str]:
    """label -> spec: a folder's basename (``.`` and ``..`` resolved: the folder's own name), or its whole path
    where two folders share a basename."""
    names = [folder_name(s) if Path(s).exists() else s for s in specs]
    return {(n if names.count(n) == 1 else s): s for n, s in zip(names, specs)}


def hub_name(spec: str) -> tuple[str, str | None]:
    """``"org/name@revision"`` -> ``("org/name", "revision")``; no ``@``: revision None (the default branch)."""
    name, at, revision = spec.partition("@")
    if at and (not name or not revision):
        raise InputError(f"model {spec!r}: write a pinned hub model as NAME@REVISION (e.g. gpt2@main)")
    return name, revision or None


def hub_config(spec: str) -> tuple[str, dict]:
    """(commit, config dict) of hub model ``spec`` (``name`` or ``name@revision``): only its
    ``config.json`` is fetched (from the local cache when offline and cached)."""
    from huggingface_hub import hf_hub_download
    from transformers.utils.hub import extract_commit_hash

    name, revision = hub_name(spec)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/"):  # never a hub name
        raise InputError(f"model {spec!r}: no such folder (and not a hub name, NAME or ORG/NAME): check the path")
    try:
        path = hf_hub_download(name, "config.json", revision=revision)
    except Exception as e:  # offline, unknown repo or revision, gated, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"could not resolve {spec!r} on the hub ({type(e).__name__}: {first}); check the name and "
                         "revision, or offline pass a local folder") from None
    commit = extract_commit_hash(path, None) or Path(path).parent.name
    return commit, json.loads(Path(path).read_text())


def _local_config(spec: str) -> tuple[Path, dict]:
    """(the model folder a local spec loads, its config dict)."""
    from interventions.zoo.train import latest_checkpoint

    p = Path(spec)
    if (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise InputError(f"run {spec} has no complete checkpoint: train it first")
        if not (p / "train_config.json").is_file():  # the run's identity (model_fingerprint) reads it
            raise InputError(f"run {spec} has no train_config.json (a copy of its checkpoints alone?): pass its "
                             f"checkpoint folder instead, e.g. {ckpt}")
        p = ckpt
    if not (p / "config.json").is_file():
        raise InputError(f"{spec} is neither a run folder nor a model folder (no config.json)")
    try:
        return p, json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{p / 'config.json'} is not valid JSON: re-save the model") from None


def model_identity(spec: str) -> dict:
    """What a model's scores are keyed on, found without loading its weights: ``{"model": content hash}``
    for a local folder or run, ``{"hub": name, "commit": sha}`` for a hub model. Checks the
    architecture is supported (and a local model's safetensors weights are readable). Raises
    ``InputError`` naming the fix."""
    from interventions.engine.adapters import ARCHS
    from interventions.zoo.train import RunFolderError, weight_keys

    local = Path(spec).exists()
    if local:
        (folder, config), key = _local_config(spec), {"model": model_fingerprint(spec)}
    else:
        commit, config = hub_config(spec)
        key = {"hub": hub_name(spec)[0], "commit": commit}
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise InputError(f"model {spec!r} has architecture {model_type!r}, which the toolkit does not support: "
                         f"supported are {', '.join(sorted(ARCHS))} (others: interventions.register_adapter)")
    if local:
        try:
            weight_keys(folder)  # present and readable (headers only): found before any model is scored
        except RunFolderError as e:
            raise InputError(f"model {spec!r}: {e}") from None
    return key


def load_any(spec: str, device: str = "cpu", allow_pickle: bool = False, revision: str | None = None):
    """A model from a run folder, a checkpoint/model folder, or a hub name (needs the network or the
    local cache; ``revision``: a commit, branch or tag, else ``name@revision`` or the default branch).

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

    name, pinned = hub_name(spec)
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision or pinned, attn_implementation="eager",
                                                    use_safetensors=not allow_pickle).to(device).eval()
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not allow_pickle and "safetensors" in str(e):
            raise InputError(f"{spec!r} has no safetensors weights on the hub ({first}); pickle weights are not "
                             "loaded by default (unpickling can run code): pass --allow-pickle "
                             "(load_any(..., allow_pickle=True)) if you trust it") from None
        raise InputError(f"could not load {spec!r} from the hub ({first}); offline, pass a local folder") from None


def load_remote(spec: str, commit: str):
    """A hub model for remote execution: nnsight's wrapper by hub id, its weights left on the server
    (only the config and tokenizer are fetched here). Not run here (no network): the remote tests
    replace it; the remote-execution work owns the contract of what the primitives take."""
    import nnsight

    return nnsight.TransformersModel(hub_name(spec)[0], task="text-generation", revision=commit)


def score_device(device: str, remote: bool = False) -> str:
    """Where the scores are computed, as a model's table is keyed on it: ``"remote"``, or the device in
    torch's spelling (``"cuda"`` and ``"cuda:0"`` stay apart: a rerun on another device scores again)."""
    import torch

    if remote:
        return "remote"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):
        raise InputError(f"device={device!r} is not a known device: use cpu, cuda, cuda:N or mps") from None


def remote_supported(score_fn) -> bool:
    """Whether ``score_fn`` (a head-score function) takes ``remote=`` (remote execution through nnsight)."""
    return "remote" in inspect.signature(score_fn).parameters


def _table(label: str) -> str:
    """Table name of one model's scores: the label made file-safe (a hub name like ``EleutherAI/pythia-70m``),
    plus a hash of the label where that changed it, so two labels never share a table.

        >>> _table("attn_2l"), _table("attn-2l"), _table("a/b") != _table("a_b")
        ('induction_attn_2l', 'induction_attn_2l_d4925f7d', True)
    """
    safe = "".join(c if c.isalnum() else "_" for c in label)
    if safe != label:
        safe += "_" + hashlib.sha256(label.encode()).hexdigest()[:8]
    return "induction_" + safe


def release(model_holder: list) -> None:
    """Drop the last reference to a model (``model_holder`` is emptied) and return its memory."""
    import torch

    alive = weakref.ref(model_holder[0])
    model_holder.clear()
    if alive() is not None:  # held by reference cycles only: collect them (a full collection costs ~0.5 s)
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_survey(models: dict[str, str], results_root: Path, seq_len: int = 50, n_examples: int = 10,
               device: str = "cpu", allow_pickle: bool = False, remote: bool = False,
               progress: bool = False) -> Results:
    """Induction scores of every head of every model in ``models`` (label -> spec), one model at a
    time, resumable (module docstring). Every model is checked first (``InputError`` naming it, and
    nothing written). Returns the ``Results`` holding ``induction_scores``."""
    from interventions.analysis import scores

    if remote:
        # Head scores read attention patterns, which need observable() (it edits the model); a server's
        # model is shared and cannot be edited, so induction_score takes no remote= and a remote survey is
        # refused here, before any work (the pass-through below is kept for when it can).
        if not remote_supported(scores.induction_score):
            raise InputError("--remote cannot run: the induction score reads attention patterns, which need "
                             "observable() and so an edited model, and a server's model is shared; run the "
                             "survey locally (without --remote)")
        local = [s for s in models.values() if Path(s).exists()]
        if local:
            raise InputError(f"--remote scores hub models only; {local[0]} is a local folder: drop it or run "
                             "without --remote")
    settings = {"seq_len": seq_len, "n_examples": n_examples}
    where = {"device": score_device(device, remote)}  # scores differ by device: another one scores again
    keys = {label: {**model_identity(spec), **settings, **where} for label, spec in models.items()}
    return _survey(models, keys, results_root, settings, device, allow_pickle, remote, progress)


@owns_results()
def _survey(models: dict[str, str], keys: dict[str, dict], results_root: Path, settings: dict, device: str,
            allow_pickle: bool, remote: bool, progress: bool) -> Results:
    from interventions.analysis import scores

    res = Results(results_root, "survey")
    # settings shared by every table; each model's table is keyed on its identity (models can be added)
    res.write_provenance(settings, models=models)
    todo = [label for label in models if not res.has(_table(label), keys[label])]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(models), initial=len(models) - len(todo), desc="survey", unit="model")
    try:
        for label in todo:
            if bar is not None:
                bar.set_postfix_str(label)
            spec, key = models[label], keys[label]
            holder = [load_remote(spec, key["commit"]) if remote else
                      load_any(spec, device, allow_pickle, revision=key.get("commit"))]
            try:
                df = _score(holder[0], scores, settings["seq_len"], settings["n_examples"], remote)
            finally:
                release(holder)  # the model is gone before the next one loads
            res.write(_table(label), df.assign(model=label), inputs=key)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    res.write("induction_scores", pd.concat([res.read(_table(label)) for label in models]))
    return res


def _score(model, scores, seq_len: int, n_examples: int, remote: bool):
    from .phase_change import probe_kwargs

    kw = probe_kwargs(model)
    kw.pop("prefix_tokens")
    kw["seq_len"] = min(seq_len, kw["seq_len"])
    if remote:
        kw["remote"] = True
    return scores.induction_score(model, n_examples=n_examples, **kw)
