"""Device placement for models split across devices (``device_map``, accelerate).

A model loaded with ``from_pretrained(..., device_map=...)`` or ``accelerate.dispatch_model`` keeps
each layer on its own device, and accelerate's hooks move every module's inputs to the module's
device. The toolkit follows three rules on such models (and on single-device ones, where each is a
no-op):

* a tensor written into a site goes to the device of the activation it replaces; a residual fed to
  a skipped block (``Run.prefix``) or an attention output fed to a skipped attention
  (``Run.attn_outputs``) to that module's device (``module_device``);
* results come back on one device, ``output_device(model)``: the device of the model's first
  parameter (its input embedding; what HF calls ``model.device``), where the tokens go. Primitives
  that reduce (losses, sweeps, patching, scores) return CPU tensors or tables;
* every parameter and buffer must be on a real device (``check_placement``): a layer left on the ``meta``
  device (offloaded to CPU or disk, or never loaded) runs on a device only inside accelerate's hook,
  so neither its site's device nor a direct call of its modules is known; such a model is refused
  before any work, naming the fix.

Example:
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20))
    >>> check_placement(model); output_device(model), module_device(model, "transformer.h.0.attn")
    (device(type='cpu'), device(type='cpu'))
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import unwrap

FIX = ("load every layer onto a device: a device_map over devices with room for the whole model (e.g. "
       "device_map='auto' with max_memory covering it, no 'disk' entries), or, to run some layers on the "
       "CPU, accelerate.dispatch_model(model, device_map, main_device='cpu') so CPU layers run on the CPU "
       "instead of being offloaded")


def check_placement(model) -> None:
    """Raise ``ValueError`` if any parameter or buffer of ``model`` is on the ``meta`` device (offloaded by
    a device map, or never loaded, e.g. a non-persistent buffer after ``load_state_dict(assign=True)``),
    naming the modules and the fix."""
    inner = unwrap(model)
    if not _any_meta(inner):  # the common case, checked on every call: plain dict walks (~10x faster)
        return
    where = sorted({name.rsplit(".", 1)[0] if "." in name else name
                    for name, p in (*inner.named_parameters(), *inner.named_buffers()) if p.device.type == "meta"})
    if where:
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        raise ValueError(f"the model has parameters or buffers on the meta device ({shown}): offloaded by its "
                         f"device_map or never loaded, so interventions cannot be placed on the device that runs "
                         f"them; {FIX}")


def _any_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer under ``module`` is on the meta device: a walk of the module dicts, every
    call (no cache: a parameter replaced or moved since the last call is seen; ~4x faster than
    ``named_parameters``)."""
    stack = [module]
    for m in stack:  # the list grows while it is walked
        if m is None:  # a child slot registered as None
            continue
        for p in m._parameters.values():
            if p is not None and p.is_meta:
                return True
        for b in m._buffers.values():
            if b is not None and b.is_meta:
                return True
        stack += m._modules.values()
    return False


def _first_param(module: nn.Module) -> torch.Tensor | None:
    """``next(module.parameters(), None)`` (the same pre-order walk) without its generator chain."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        p = None if child is None else _first_param(child)
        if p is not None:
            return p
    return None


def module_device(model, path: str | None = None) -> torch.device:
    """Device of the module at dotted ``path`` (its first parameter, else its nearest ancestor's with
    one), or ``output_device(model)`` for ``path=None``."""
    inner = unwrap(model)
    parts = [] if path is None else path.split(".")
    while parts:
        module = inner
        for part in parts:
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        p = _first_param(module)
        if p is not None:
            return p.device
        parts = parts[:-1]
    return output_device(inner)


def output_device(model) -> torch.device:
    """The one device results come back on: the model's first parameter's (its input embedding's)."""
    p = _first_param(unwrap(model))
    return torch.device("cpu") if p is None else p.device
