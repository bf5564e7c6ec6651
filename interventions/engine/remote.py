"""Running the engine's traces on NDIF (the National Deep Inference Fabric) through nnsight.

``remote=True`` sends every trace of a primitive to NDIF: the model is named by its hub id and runs on
the server's copy (no weights are loaded here), the trace body and the tensors it reads travel in the
request, and only the values the body saves come back. ``remote="local"`` runs nnsight's
``LocalSimulationBackend`` instead: the request is serialised and deserialised as for the server (with
modules that are not installed hidden), then runs here on the wrapper's own weights. It is the
offline check of the remote path; it needs neither an API key nor a hub id.

The server does not have this package. So the engine sends plain data (module paths, index tuples,
view shapes, tensors) and a trace body that uses only torch, ``nnsight.save`` and builtins on NDIF's
sandbox whitelist (``isinstance``, ``getattr``, ``int``, ``tuple``, ``type``), and every container that
collects results is created inside the trace (a server returns saved values only; a list made before
the trace would be filled on the server's copy and come back empty).

What cannot run remotely raises ``NotRemotable`` before anything is sent:

* attention patterns (pattern sites, ``observable``, ``PatternPreserving``, ``patch_patterns``): they
  add a module to every attention layer and switch the attention implementation, i.e. they edit the
  model, and a server's model is shared by its users (and not here to edit);
* functions as written values (``FunctionAblation``, ``Write(site, fn)``): the function would run
  inside the trace on the server, so it and everything it uses would have to be shipped by source
  and pass the server's import whitelist, which cannot be checked before sending (nnsight ships a
  function by source only when it is defined in a script or notebook; ``FunctionAblation`` hands it
  a ``Head`` of this package, which the server cannot unpickle). Compute the replacement here
  instead: a tensor value (e.g. from ``run_with_cache(..., remote=True)``) runs remotely.

The take-effect check (``Engine._verify``: NaN written at a site must reach the logits) is not run
remotely: each probe would be one more job on a shared server, and it proves an adapter, not a
model; the built-in adapters (``BUILTIN_ARCHS``) are proven on every architecture by the tests. For an
architecture registered with ``register_adapter`` a remote run warns that its writes are unproven:
run any primitive once locally on a small model of that architecture to prove them.

Example:
    >>> check_remote(object(), False)
    False
    >>> check_remote(object(), "yes")
    Traceback (most recent call last):
    ...
    ValueError: remote='yes' is unknown: use True (run on NDIF), 'local' (nnsight's offline simulation of the remote path) or False
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

from torch import nn

Remote = bool | Literal["local"]

KEY_HINT = ("create a key at https://login.ndif.us, then `export NDIF_API_KEY=<key>` or "
            "`nnsight.CONFIG.set_default_api_key('<key>')` (saved for later sessions)")


class NotRemotable(ValueError):
    """A primitive, option or model cannot run remotely (raised before anything is sent)."""


def api_key() -> str | None:
    """The NDIF API key nnsight would send: its config's, else ``NDIF_API_KEY`` (nnsight reads the
    variable when it is imported; one set later is copied into its config here, not saved)."""
    from nnsight import CONFIG

    key = CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY") or None
    if key and not CONFIG.API.APIKEY:
        CONFIG.API.APIKEY = key
    return key


def _not_loaded(model) -> bool:
    """An nnsight wrapper built from a hub id without ``dispatch=True``: its weights are on the meta device."""
    if isinstance(model, nn.Module):  # a torch module, not a wrapper (checked first: a getattr miss costs ~1 us)
        return False
    if getattr(model, "dispatched", True) is not False:
        return False
    inner = getattr(model, "_module", model)
    p = next(inner.parameters(), None)
    return p is not None and p.is_meta


def check_remote(model, remote) -> Remote:
    """Validate ``remote`` for ``model`` before any work; returns False, True or "local".

    ``remote=True`` needs an ``nnsight.LanguageModel`` / ``TransformersModel`` made from a hub id (the
    server runs its own copy of that model; a wrapper of a module loaded here is refused) and an API key; ``remote="local"`` any such wrapper with
    loaded weights. A local run (False) of a wrapper whose weights were never loaded is refused too."""
    if remote is None or remote is False:
        if _not_loaded(model):
            raise ValueError(f"the weights of {getattr(model, 'repo_id', 'this model')!r} are not loaded (an nnsight "
                             "wrapper made from a hub id without dispatch=True holds meta tensors): pass remote=True "
                             "to run on NDIF, or load it here with nnsight.LanguageModel(id, dispatch=True)")
        return False
    if remote is not True and remote != "local":
        raise ValueError(f"remote={remote!r} is unknown: use True (run on NDIF), 'local' (nnsight's offline "
                         "simulation of the remote path) or False")
    import nnsight

    if not isinstance(model, nnsight.TransformersModel):
        kind = ("a bare nnsight.NNsight wrapper, which has no remote=" if isinstance(model, nnsight.NNsight)
                else f"a {type(model).__name__}")
        raise NotRemotable(f"remote={remote!r} needs the model as nnsight.LanguageModel('<hub id>') (or "
                           "nnsight.TransformersModel), e.g. nnsight.LanguageModel('openai-community/gpt2'); "
                           f"got {kind}."
                           " To try the remote path on a model built here, wrap it: "
                           "nnsight.LanguageModel(model, tokenizer=tokenizer), and pass remote='local'")
    if remote == "local":
        if _not_loaded(model):
            raise NotRemotable("remote='local' runs nnsight's simulation here, on this wrapper's own weights, which "
                               "are not loaded: make it with dispatch=True, or use remote=True to run on NDIF")
        return "local"
    repo = getattr(model, "repo_id", None)
    if not isinstance(repo, str) or not repo.strip():
        raise NotRemotable("remote=True: this model has no hub id (it was built from a config or wraps a module "
                           "made here), and NDIF runs its own copies of hub models, named by id: use "
                           "nnsight.LanguageModel('<hub id>'), e.g. 'openai-community/gpt2' (nnsight.ndif_status() "
                           "lists the models NDIF serves); to check the remote path offline pass remote='local'")
    if os.path.exists(repo):
        raise NotRemotable(f"remote=True: {repo!r} is a local path, not a hub id; NDIF runs its own copies of hub "
                           "models: wrap the hub id, e.g. nnsight.LanguageModel('openai-community/gpt2'), or pass "
                           "remote='local' to run the simulation on this local model")
    if isinstance((getattr(model, "args", None) or (None,))[0], nn.Module):  # its repo_id is the module's name_or_path
        raise NotRemotable(f"remote=True: this wrapper holds a module loaded here (its hub id {repo!r} is the module's "
                           "name_or_path), but NDIF runs its own copy of that hub model, not these weights (edits, "
                           f"fine-tuning or another revision would be lost silently): wrap the hub id, "
                           f"nnsight.LanguageModel({repo!r}) (no weights are loaded), or pass remote='local' to run "
                           "this module in the simulation")
    if not api_key():
        raise NotRemotable(f"remote=True needs an NDIF API key and none is configured: {KEY_HINT}")
    return True


def warn_unproven(adapter) -> None:
    """Warn that a registered (not built-in) adapter's writes are not proven on a remote run."""
    from .adapters import BUILTIN_ARCHS

    if BUILTIN_ARCHS.get(adapter.model_type) is adapter.spec:
        return
    warnings.warn(f"remote run on a {adapter.model_type!r} model with a registered adapter: the take-effect "
                  "check does not run remotely, so its writes are unproven; run any primitive once locally on a "
                  "small model of this architecture to prove them", stacklevel=4)
