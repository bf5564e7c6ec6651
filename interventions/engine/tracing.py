"""The one trace engine: a run described as data, executed by one driver.

A ``Run`` says what to read (sites, or ``Read``: a site narrowed to some heads and/or its mean over the
batch rows, taken where the model runs), what to write (``Write``: a site, optionally restricted to batch
rows, one head and a position, and the value: a tensor, ``None`` for zero, or a function of the current
activation), and which layers the caller already computed (``start`` / ``prefix``: blocks below
``start`` are skipped and their output replaced; ``attn_outputs``: an attention module skipped and its
output given). ``execute(model, run)`` is the only place in the package that opens an nnsight trace.
It owns, for every primitive alike:

* execution order (sites visited in the order of ``interventions.engine.sites.LAYER_KINDS``),
* attention mask and position ids of padded batches (each real token at its unpadded position),
* ``use_cache=False``, and eval mode (a model, or any of its modules, left in training mode with active
  dropout runs in eval mode, with a warning, and is put back; not with ``remote=True``, where the server
  runs its own model),
* placement of each written tensor on its site's device and dtype, of ``prefix`` / ``attn_outputs`` on
  their module's device, and the refusal of layers left on the meta device (multi-device models:
  ``interventions.engine.devices``),
* error translation by exception type (nnsight's ``OutOfOrderError``: a target that never ran),
* a take-effect check: the first write to a (layer, kind) of a model is probed once by writing NaN
  there on a 2-token input and requiring NaN in the logits (or, where an attention kernel masks NaN
  scores, a changed logit under a random perturbation), which proves the forward *consumes* the site
  (not just that the tensor was written),
* what comes back (``Run.returns``): the logits, or only the per-token loss or chosen logits, reduced
  where the model runs,
* remote execution (``Engine(model, remote=True)`` or ``"local"``, see ``interventions.engine.remote``):
  the run is turned into plain data (module paths, index tuples, view shapes, tensors) before the
  trace opens, and the trace body uses only torch and nnsight, so it runs on a server that does not
  have this package; what cannot run there is refused before anything is sent.

The engine keeps no reference to a model after a call: each model's nnsight wrapper is built once and
cached with weak references only (the model is freed by reference counting when its user drops it).

Example:
    >>> import torch
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
    >>> tokens = torch.zeros(1, 5, dtype=torch.long)
    >>> out = execute(model, Run(tokens, reads=["L0.z"], writes=[Write("L1.z", None, head=0)]))
    >>> out.logits.shape, out.acts["L0.z"].shape
    (torch.Size([1, 5, 20]), torch.Size([1, 5, 2, 8]))
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .adapters import Adapter, get_adapter, has_pattern_site, module_at, unwrap
from .remote import NotRemotable, Remote, check_remote, warn_unproven
from .devices import check_placement, module_device, output_device
from .sites import KV_KINDS, LAYER_KINDS, RESID_KINDS, SITE_KINDS, Site, kv_head_of, parse_site


class InterventionError(RuntimeError):
    """An intervention could not be applied (its target did not run, or the forward ignored it)."""


Value = torch.Tensor | None | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Write:
    """Write ``value`` into ``site`` (``"L1.z"`` or ``Site``), at batch ``rows``, head ``head`` (query head
    for q / z / pattern, key/value head for k / v) and position ``pos`` (the query position for a
    pattern); ``None`` for any of them means all. ``rows`` / ``pos``: an int, a slice, a list or tensor of
    ints, or a torch bool tensor (a mask over that axis); bools and lists of bools are refused.

    ``value``: a tensor broadcastable to the indexed part of the site (shapes in
    ``interventions.engine.sites``), ``None`` for zero, or a function of the current activation there
    (a clone) returning its replacement of the same shape."""

    site: Site | str
    value: Value = None
    rows: slice | None = None
    head: int | None = None
    pos: int | slice | None = None

    def index(self, kind: str) -> tuple:
        rows = slice(None) if self.rows is None else self.rows
        pos = slice(None) if self.pos is None else self.pos
        head = slice(None) if self.head is None else self.head
        if kind == "pattern":  # (batch, head, q_pos, k_pos)
            return rows, head, pos
        if kind in RESID_KINDS:  # (batch, pos, d_model)
            return rows, pos
        return rows, pos, head  # (batch, pos, head, d_head)


@dataclass(frozen=True)
class Gather:
    """Return only ``logits[row, pos, ids[row]]``: ``pos`` an int, or a (batch,) tensor of one position per
    row (e.g. each row's last real token in a padded batch); ``ids`` (batch, n) or (n,) token ids; the
    result is a (batch, n) float tensor (e.g. a correct and a wrong answer's logits for a logit difference)."""

    pos: int | torch.Tensor
    ids: torch.Tensor


@dataclass(frozen=True)
class Read:
    """Read ``site`` narrowed where the model runs, so that remotely only that much travels back:
    ``heads`` (query heads for q / z / pattern, key/value heads for k / v; None: all) keeps those, in
    the order given, on the site's head axis; ``mean_rows`` returns the mean over the batch rows (the
    site's shape without its batch axis; refused on a padded run, whose pads would enter the mean).
    ``Result.acts`` holds it under the site's name, e.g. ``Read("L1.z", heads=[0, 2], mean_rows=True)``
    gives ``acts["L1.z"]`` of shape (pos, 2, d_head)."""

    site: Site | str
    heads: Sequence[int] | None = None
    mean_rows: bool = False


@dataclass
class Run:
    """One forward pass described as data (see the module docstring)."""

    tokens: torch.Tensor  # (batch, pos)
    reads: Sequence[Site | str | Read] = ()
    writes: Sequence[Write] = ()
    attention_mask: torch.Tensor | None = None  # (batch, pos), 1 = real token
    start: int = 0  # blocks below are skipped ...
    prefix: torch.Tensor | None = None  # ... and the residual entering block ``start`` is this (batch, pos, d_model)
    attn_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> attention output (batch, pos, d_model)
    # What comes back from the logits: all of them, the per-token loss (batch, pos - 1) in nats (entry t:
    # predicting token t + 1; float32), ``Gather``, or nothing ("none": only the reads). Reduced where the
    # model runs: remotely only that much travels back (logits are batch x pos x vocab floats).
    returns: Literal["logits", "loss", "none"] | Gather = "logits"


@dataclass
class Result:
    """Logits (or the reduction the run returns) and read activations; from ``Engine.run`` each on the
    device that computed it (the unembedding's, the site's), from ``execute`` all on the model's first
    parameter's device."""

    logits: torch.Tensor | None  # (batch, pos, vocab) when the run returns "logits", else None
    acts: dict[str, torch.Tensor]  # site name -> activation in the site's shape (after that site's writes; a Read's narrowed)
    loss: torch.Tensor | None = None  # (batch, pos - 1) when the run returns "loss"
    gathered: torch.Tensor | None = None  # (batch, n) when the run returns a Gather


# ----------------------------------------------------------------------------- input validation

# The last tensor of token ids found valid, as (tensor (weakly), its version, vocab_size, n_ctx): a primitive
# checks its tokens before preparing its runs and each run checks them again (two reductions each time).
_last_valid: tuple | None = None


def check_tokens(tokens, adapter: Adapter, name: str = "tokens") -> torch.Tensor:
    """Validate a (batch, pos) tensor of token ids; returns it (never modified)."""
    global _last_valid
    last = _last_valid
    if (last is not None and last[0]() is tokens and last[1] == tokens._version and last[2] == adapter.vocab_size
            and last[3] == adapter.n_ctx):  # the same tensor, unchanged since (in-place edits bump _version)
        return tokens
    if not torch.is_tensor(tokens):
        raise ValueError(f"{name} must be a torch.LongTensor of shape (batch, pos), got {type(tokens).__name__}: "
                         f"convert it with torch.as_tensor({name})")
    if tokens.dim() == 1:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}: add a batch dimension (tokens[None])")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, pos), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids (torch.long), got dtype {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)}): pass at least one token")
    if adapter.n_ctx is not None and tokens.shape[1] > adapter.n_ctx:
        raise ValueError(f"{name} has {tokens.shape[1]} positions, more than the model's context of "
                         f"{adapter.n_ctx}: truncate to {adapter.n_ctx}")
    if tokens.is_meta:
        raise ValueError(f"{name} are on the meta device (no data): pass real token ids (e.g. on the CPU)")
    lo, hi = (int(v) for v in torch.aminmax(tokens))
    if lo < 0 or hi >= adapter.vocab_size:
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {adapter.vocab_size}) (min {lo}, max {hi}): "
                         "tokenise with this model's tokenizer")
    _last_valid = (weakref.ref(tokens), tokens._version, adapter.vocab_size, adapter.n_ctx)
    return tokens


def check_value(value, shape: tuple[int, ...], label: str, full: tuple[int, ...] | None = None) -> None:
    """A written value must be a tensor broadcastable to the written part ``shape`` of a site (of ``full``
    shape), ``None`` (zero) or a function of the current activation; ValueError naming ``label`` otherwise."""
    if torch.is_tensor(value):
        try:
            ok = torch.broadcast_shapes(tuple(value.shape), shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            whole = "" if full is None else f" (full shape {full})"
            raise ValueError(f"{label}: a value of shape {tuple(value.shape)} does not fit the written part {shape} of "
                             f"the site{whole}; see interventions.engine.sites")
    elif value is not None and not callable(value):
        raise ValueError(f"{label}: value must be a tensor, None (zero) or a function of the current activation, got "
                         f"{type(value).__name__}")


def check_mask(attention_mask: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """An attention mask must match the tokens' shape, hold 0/1 (1 = real token) and give each row one run
    of real tokens (padding on the left, the right or both): a gap between real tokens would be dropped
    by the runs (position ids skip it) but not by every measure of them (a loss across it; a smeared key
    after it), so no result could equal the prompt's unpadded one."""
    if attention_mask is None:
        return
    if not torch.is_tensor(attention_mask) or attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must be a tensor of the tokens' shape {tuple(tokens.shape)}, got "
                         f"{tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__}")
    if attention_mask.is_meta:
        raise ValueError("attention_mask is on the meta device (no data): pass a real 0/1 tensor (e.g. on the CPU)")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if not bool(attention_mask.any(-1).all()):  # a row of only padding (rows listed only then)
        empty = (attention_mask == 0).all(-1).nonzero().flatten().tolist()
        rows = "" if len(empty) == 1 else f" (rows {empty})"
        raise ValueError(f"attention_mask row {empty[0]} has no real token{rows}: drop sequences that are all padding")
    count = attention_mask.long().cumsum(-1)  # real tokens up to each column
    gap = (attention_mask == 0) & (count > 0) & (count < count[:, -1:])
    if bool(gap.any()):
        row, col = gap.nonzero()[0].tolist()
        raise ValueError(f"attention_mask row {row} has padding between real tokens (column {col}): pass each "
                         "prompt padded on the left or the right (or both), one run of real tokens per row; "
                         "remove the gap")


def position_ids(attention_mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """(batch, pos) position of each token in its unpadded sequence (padding: 0)."""
    if attention_mask is None:
        return torch.arange(tokens.shape[1], device=tokens.device)[None].expand(tokens.shape)
    return (attention_mask.to(tokens.device).long().cumsum(-1) - 1).clamp(min=0)


def pad_to_nan(losses: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Set per-token losses (batch, pos - 1) whose context or target token is padding to NaN."""
    if attention_mask is None:
        return losses
    m = attention_mask.to(losses.device).bool()
    return losses.masked_fill(~(m[:, :-1] & m[:, 1:]), float("nan"))


def indexed_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    """The shape of ``torch.empty(shape)[index]`` for an index of ints, slices and None-free parts,
    computed without a tensor (IndexError as torch raises it). Other indices: via a meta tensor.

    >>> indexed_shape((2, 5, 4, 8), (slice(0, 1), 3, slice(None)))
    (1, 4, 8)
    """
    out = []
    for i, part in enumerate(index):
        n = shape[i]
        if type(part) is int:
            if not -n <= part < n:
                raise IndexError(f"index {part} is out of bounds for dimension {i} with size {n}")
        elif type(part) is slice:
            if part.step is not None and part.step <= 0:
                return tuple(torch.empty(shape, device="meta")[index].shape)  # torch's own error
            out.append(len(range(*part.indices(n))))
        else:
            return tuple(torch.empty(shape, device="meta")[index].shape)
    return tuple(out) + tuple(shape[len(index):])


def without_grad(fn):
    """``torch.no_grad()`` as a decorator, minus its cost (~1.5 us a call, more with a cold cache) when
    gradients are already off: a primitive of one trace pays it on every call.

    >>> f = without_grad(lambda: torch.is_grad_enabled())
    >>> f()
    False
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def check_positive(value, name: str, allow_none: bool = False, minimum: int = 1, why: str = "") -> int | None:
    """``value`` (an int or numpy integer, not a bool) >= ``minimum`` as an int; None passes with
    ``allow_none``; ValueError otherwise (``why``, if given, follows the message after a colon)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} must be {what}" + (" or None" if allow_none else "")
                         + (f": {why}" if why else ""))
    return int(value)


def is_bool(x) -> bool:
    """A Python, numpy or 0-d torch bool."""
    return isinstance(x, bool) or (str(getattr(x, "dtype", "")) in ("bool", "torch.bool") and getattr(x, "ndim", 1) == 0)


def as_position(pos):
    """``pos`` as an int when it is one integer position: an int, a numpy integer or a 0-d integer torch
    tensor (a bool of any kind is not); anything else unchanged, for ``check_position`` to refuse."""
    if is_bool(pos):
        return pos
    if torch.is_tensor(pos) and pos.dim() == 0 and not (pos.is_floating_point() or pos.is_complex()):
        return int(pos)
    return int(pos) if isinstance(pos, numbers.Integral) else pos


def check_position(pos, size: int, label: str, several: str = "") -> int:
    """``pos`` (as ``as_position`` takes it) as an int in [-size, size); ValueError naming ``label`` (e.g.
    "logit_diff pos") otherwise, with ``several`` added where ``pos`` is not one position. A bool is refused:
    an int to isinstance, it indexes as a new axis (logits[:, True]) and fails inside the trace."""
    where = as_position(pos)
    fix = f"pass an int in [-{size}, {size})"
    if is_bool(where):
        raise ValueError(f"{label}={pos!r} is a bool, not a position: {fix}")
    if not isinstance(where, int):
        raise ValueError(f"{label}={pos!r} is not one position: {fix}" + (f" ({several})" if several else ""))
    if not -size <= where < size:
        raise ValueError(f"{label}={pos!r} out of range for {size} positions: {fix}")
    return where


def rounding_tolerance(x: torch.Tensor) -> float:
    """How far two computations of ``x`` that should agree may differ by rounding alone: 1e-5 (float32 /
    float64) or 1e-2 (half precision) times max(1, its largest finite magnitude)."""
    scale = max(1.0, float(x.detach().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())) if x.numel() else 1.0
    return (1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-2) * scale


def holds_bools(x) -> bool:
    """A list / tuple (nested or not) of bools, or a numpy bool array."""
    if isinstance(x, (list, tuple)):
        return any(is_bool(v) or holds_bools(v) for v in x)
    return type(x).__module__ == "numpy" and str(getattr(x, "dtype", "")) == "bool"


def check_index(part, name: str, label: str, size: int) -> None:
    """Refuse bools as a write's ``rows`` / ``pos``: a bool scalar indexes as a new axis (True would write
    everywhere), a list or numpy array of bools fails inside torch's shape check. A (size,) torch bool
    tensor is a mask and is kept."""
    if part is None or type(part) in (int, slice):  # the common cases, on every write: nothing to refuse
        return
    what = "row" if name == "rows" else "position"
    if is_bool(part):
        raise ValueError(f"{label}: {name}={part!r} is a bool, not an index: pass {name}=int(i) for one {what}, "
                         f"or None for all")
    if holds_bools(part):
        raise ValueError(f"{label}: {name} is a list of bools: pass the {what}s as ints, e.g. "
                         f"{name}=torch.nonzero(mask).flatten().tolist(), or the mask as a torch bool tensor of "
                         f"length {size}")


# ----------------------------------------------------------------------------- the engine

# model -> {(spec, layer, kind)} whose consumption by the forward was proven (weak keys: no reference)
_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _dropout_active(inner: nn.Module) -> bool:
    """Whether a forward of ``inner`` would drop out: a module in training mode that is an active
    ``nn.Dropout``, or any module in training mode where the config sets an attention dropout (HF's
    attention modules apply it functionally, in their own training mode). Every module is looked at, not
    only the model: ``model.eval()`` followed by ``model.model.train()`` (or one layer's) leaves the
    model's own flag False and its dropout active."""
    c = getattr(inner, "config", None)
    functional = any(float(getattr(c, name, 0) or 0) > 0 for name in ("attention_dropout", "attn_pdrop"))
    stack = [inner]  # a walk over ``_modules``: several times faster than ``modules()`` (no names, no memo)
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if m.training and (functional or (isinstance(m, nn.Dropout) and m.p > 0)):
            return True
        stack.extend(m._modules.values())
    return False


@contextlib.contextmanager
def _eval_mode(inner: nn.Module):
    """Run in eval mode if dropout would otherwise make the run random; restore the modes after."""
    if not _dropout_active(inner):
        yield
        return
    warnings.warn("the model (or one of its modules) is in training mode with dropout: running it in eval mode "
                  "for this call (call model.eval() to silence this)", stacklevel=4)
    modes = [(m, m.training) for m in inner.modules()]
    inner.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


FINAL = Site(None, "final")

# model -> _Tree: the bare nnsight wrapper of each model, built once (an envoy tree costs ~0.3 ms, a
# third of a small forward) and reused while the model's module structure is unchanged. Its envoys hold
# the modules by weak proxy, so the cache keeps no model alive (weak keys, no reference in the value).
_TREES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Tree:
    """A bare ``nnsight.NNsight`` over a model whose envoys reference their modules weakly (nnsight only
    calls and reads a module through its envoy), with every module path's envoy and module (weakly)."""

    def __init__(self, inner: nn.Module):
        import nnsight

        self.lm = nnsight.NNsight(inner)
        self.paths: dict[str, tuple[object, weakref.ref, tuple[str, ...]]] = {}  # path -> (envoy, module, parts)
        self.adapter: Adapter | None = None  # the adapter the two caches below were made with
        self.points: dict[Site, tuple[str, str]] = {}  # site -> (module path, input/output)
        self.sites: set[Site] = set()  # sites whose module was found on this model
        stack = [("", self.lm)]
        while stack:
            path, env = stack.pop()
            self.paths[path] = (env, weakref.ref(env.__dict__["_module"]), tuple(path.split(".")) if path else ())
            stack.extend((f"{path}.{name}" if path else name, child) for name, child in env._child_map.items())
        for env, ref, _ in self.paths.values():
            if not isinstance(env.__dict__["_module"], weakref.ProxyTypes):
                env.__dict__["_module"] = weakref.proxy(ref())

    def point(self, adapter: Adapter, site: Site, inner: nn.Module) -> tuple[str, str]:
        if adapter is not self.adapter:  # the registry or the config changed: forget what the old one said
            self.adapter, self.points, self.sites = adapter, {}, set()
        point = self.points.get(site)
        if point is None:
            point = self.points[site] = adapter.point(site, inner)
        return point

    def envoy(self, path: str):
        return self.paths[path][0]

    def holds(self, inner: nn.Module, paths) -> bool:
        """Whether each module path is, on the model now, the module this tree wraps there (a user may
        replace a submodule; ``observable`` adds pattern modules), and no trace of this tree is running.
        Modules no run touches are not compared: a tree's stale envoy there is never used."""
        if self.lm.interleaver.interleaving:
            return False
        for path in paths:
            entry = self.paths.get(path)
            if entry is None:
                return False
            module = inner
            for part in entry[2]:  # the module at the path now (plain dict look-ups: nn.Module.__getattr__ is slow)
                module = module._modules.get(part)
                if module is None:
                    return False
            if module is not entry[1]():
                return False
        return True


class Engine:
    """Executes runs on one model; build one per primitive call (it holds the model until dropped).

    ``remote``: False (here), True (on NDIF; ``model`` an ``nnsight.LanguageModel`` made from a hub id,
    an API key configured) or ``"local"`` (nnsight's offline simulation of the remote path); validated
    here, before any work (``interventions.engine.remote``)."""

    def __init__(self, model, remote: Remote = False):
        self.remote = check_remote(model, remote)
        self.model = model  # the wrapper a remote run traces through (it names the server's model)
        self.inner = unwrap(model)
        self.adapter = get_adapter(self.inner)
        if self.remote is not True:  # a server's model is not here (its weights are on the meta device)
            check_placement(self.inner)  # a layer on the meta device: refused before any work

    def _tree(self, run: Run, sites) -> _Tree:
        """The model's cached ``_Tree``, rebuilt unless it wraps the modules a run touches as they are now."""
        tree = _TREES.get(self.inner)
        if tree is None or not tree.holds(self.inner, self._touched(tree, run, sites)):
            tree = _Tree(self.inner)
            _TREES[self.inner] = tree
        return tree

    def _touched(self, tree: _Tree, run: Run, sites) -> list[str]:
        """Module paths a run reads, writes or skips, and the unembedding's."""
        a, inner = self.adapter, self.inner
        paths = [tree.point(a, FINAL, inner)[0]]
        for site in sites:
            try:
                paths.append(tree.point(a, site, inner)[0])
            except (AttributeError, IndexError, ValueError):
                pass  # not on this model: _check_site says so
        if run.start or run.attn_outputs:
            paths += [a.path(layer, "layer") for layer in range(run.start)]
            paths += [a.path(layer, "attn") for layer in run.attn_outputs]
        return paths

    def device(self, path: str | None = None) -> torch.device:
        """Device of the module at ``path`` (its first parameter), else of the model's first parameter
        (where the tokens go and results are gathered): a tensor fed to a module goes to that module's
        device (multi-device models; ``interventions.engine.devices``)."""
        return module_device(self.inner, path)

    def dtype_size(self) -> int:
        """Bytes per element of the model's floating-point parameters (its activations and logits)."""
        p = next((p for p in self.inner.parameters() if p.is_floating_point()), None)
        return 4 if p is None else p.element_size()

    # ------------------------------------------------------------------ validation
    def _reads(self, run: Run) -> tuple[list[Site], dict[Site, tuple]]:
        """The run's read sites (each once), and {site: (head index or None, mean over rows)}; a site read
        twice must be read the same way."""
        a = self.adapter
        specs: dict[Site, tuple] = {}
        for r in run.reads:
            if not isinstance(r, Read):
                site, spec = parse_site(r, a.n_layers), (None, False)
            else:
                site, spec = parse_site(r.site, a.n_layers), (self._read_index(r, a), r.mean_rows)
                if r.mean_rows and run.attention_mask is not None:
                    raise ValueError(f"Read({site}, mean_rows=True) on a padded run: the pads would enter the mean; "
                                     "read the rows (mean_rows=False) and average the real tokens yourself")
            if specs.setdefault(site, spec) != spec:
                raise ValueError(f"site {site} is read twice, differently: read it once")
        return list(specs), specs

    @staticmethod
    def _read_index(r: Read, a: Adapter) -> tuple | None:
        """The index a ``Read``'s heads take on its site's view (None: every head), validated."""
        site = parse_site(r.site, a.n_layers)
        if not isinstance(r.mean_rows, bool):
            raise ValueError(f"Read({site}): mean_rows={r.mean_rows!r} must be True or False")
        if r.heads is None:
            return None
        if site.kind in RESID_KINDS:
            raise ValueError(f"Read({site}, heads=...): a {site.kind} site has no head axis; pass heads=None")
        n = a.n_heads if site.kind == "pattern" else a.n_site_heads(site.kind)
        heads = list(r.heads) if isinstance(r.heads, (list, tuple, range)) else None
        if not heads or not all(isinstance(h, numbers.Integral) and not isinstance(h, bool) and 0 <= h < n
                                for h in heads):
            what = "key/value heads" if site.kind in KV_KINDS else "heads"
            raise ValueError(f"Read({site}, heads={r.heads!r}): pass a non-empty list of {what} in 0-{n - 1}")
        heads = [int(h) for h in heads]
        return (slice(None), heads) if site.kind == "pattern" else (slice(None), slice(None), heads)

    def _check_site(self, site: Site, batch: int, pos: int, tree: _Tree | None) -> tuple[int, ...]:
        """The site's full shape; raises if it does not exist on this model."""
        a = self.adapter
        if site.kind == "pattern" and not has_pattern_site(self.inner):
            raise InterventionError(f"site {site}: attention patterns are not observable on this model's "
                                    "attention path (SDPA/flash computes no pattern): run inside "
                                    "`with interventions.observable(model):`")
        if tree is None:  # a remote run: nothing cached
            self._check_module(site)
        elif tree.adapter is not a or site not in tree.sites:
            self._check_module(site)
            tree.point(a, site, self.inner)
            tree.sites.add(site)
        if site.kind in RESID_KINDS:
            return batch, pos, a.d_model
        if site.kind == "pattern":
            return batch, a.n_heads, pos, pos
        return batch, pos, a.n_site_heads(site.kind), a.d_head

    def _check_module(self, site: Site) -> None:
        a = self.adapter
        path, _ = a.point(site, self.inner)
        try:
            module_at(self.inner, path)
        except (AttributeError, IndexError):
            if site.kind == "mlp_out":
                raise ValueError(f"site {site} does not exist: this {a.model_type} model has no MLP at {path!r}: an "
                                 "attention-only model has no mlp_out (use attn_out or resid_post); a model whose MLP "
                                 "is elsewhere needs its path: register the adapter with "
                                 "interventions.ArchSpec(mlp=<path relative to a block>)") from None
            raise InterventionError(f"site {site}: this {a.model_type} model has no module at {path!r}: fix the "
                                    "adapter with interventions.register_adapter") from None

    def _check_write(self, w: Write, site: Site, full: tuple[int, ...]) -> tuple[int, ...]:
        a = self.adapter
        if w.head is not None:
            if site.kind in RESID_KINDS:
                raise ValueError(f"write to {site}: the site has no heads; drop head={w.head}")
            n = a.n_site_heads(site.kind)
            if type(w.head) is not int:  # a bool, or a numpy / torch number (was reported as out of range)
                raise ValueError(f"write to {site}: head {w.head!r} is not an int: pass head=int(h), or None for all "
                                 "heads")
            if not 0 <= w.head < n:
                what = "kv head" if site.kind in KV_KINDS else "head"
                extra = (f" (grouped-query attention: query head h reads kv head h // {a.n_heads // a.n_kv_heads})"
                         if site.kind in KV_KINDS and a.n_kv_heads != a.n_heads else "")
                raise ValueError(f"write to {site}: {what} {w.head!r} out of range: layer {site.layer} has "
                                 f"{what}s 0-{n - 1}{extra}")
        check_index(w.rows, "rows", f"write to {site}", full[0])
        check_index(w.pos, "pos", f"write to {site}", full[2 if site.kind == "pattern" else 1])
        # torch pairs several index lists element by element: rows=[0, 2], pos=[1, 3] would write (0, 1) and
        # (2, 3) only, not the grid of four a reader expects
        lists = [name for name, part in (("rows", w.rows), ("pos", w.pos))
                 if isinstance(part, (list, tuple)) or (torch.is_tensor(part) and part.dim() > 0)]
        if len(lists) > 1:
            raise ValueError(f"write to {site}: rows {w.rows!r} and pos {w.pos!r} are both lists: torch would pair "
                             "them element by element, not select every row at every position; give one as a slice "
                             "or an int, or write once per row")
        try:
            shape = indexed_shape(full, w.index(site.kind))
        except IndexError as e:
            raise ValueError(f"write to {site}: rows/pos {w.rows}/{w.pos} do not index a site of shape {full}: {e}") from None
        if 0 in shape:  # a slice past the end is empty, not an error: the write would silently change nothing
            raise ValueError(f"write to {site}: rows/pos {w.rows}/{w.pos} selects nothing of a site of shape {full}: "
                             "index rows within the batch and positions within the sequence")
        check_value(w.value, shape, f"write to {site}", full)
        return shape

    # ------------------------------------------------------------------ running
    def run(self, run: Run, verify: bool = True) -> Result:
        if torch.is_grad_enabled():  # (a no_grad decorator costs a few microseconds per call even when off)
            with torch.no_grad():
                return self.run(run, verify)
        a, inner = self.adapter, self.inner
        tokens = check_tokens(run.tokens, a)
        check_mask(run.attention_mask, tokens)
        batch, pos = tokens.shape
        one = run.reads if isinstance(run.reads, str) or (isinstance(run.reads, tuple) and len(run.reads) == 2
                                                          and not isinstance(run.reads[0], str)
                                                          and run.reads[1] in SITE_KINDS) else None
        if one is not None:  # iterated, a site string reads as its characters ("malformed site 'L'")
            raise ValueError(f"reads={one!r} is one site: pass a list of sites, reads=[{one!r}]")
        if isinstance(run.reads, Read):
            raise ValueError("reads=Read(...) is one read: pass a list, reads=[Read(...)]")
        if isinstance(run.writes, Write):
            raise ValueError("writes=Write(...) is one write: pass a list of writes, writes=[Write(...)]")
        reads, narrow = self._reads(run)
        writes: dict[Site, list[Write]] = {}
        for w in run.writes:
            if not isinstance(w, Write):
                raise ValueError(f"writes must be Write objects, got {type(w).__name__}")
            writes.setdefault(parse_site(w.site, a.n_layers), []).append(w)
        if self.remote:
            self._check_remotable(reads, writes)
        if not isinstance(run.start, int) or not 0 <= run.start < a.n_layers:
            raise ValueError(f"start={run.start!r} must be a layer 0-{a.n_layers - 1}")
        if (run.start > 0) != (run.prefix is not None):
            raise ValueError("a run that starts above layer 0 needs prefix (the residual entering that layer), "
                             "and only such a run takes one")
        if run.prefix is not None and tuple(run.prefix.shape) != (batch, pos, a.d_model):
            raise ValueError(f"prefix has shape {tuple(run.prefix.shape)}; expected {(batch, pos, a.d_model)}")
        inside_attn = {"q", "k", "v", "pattern", "z", "attn_out"}
        wanted = set(reads) | set(writes)
        for layer in run.attn_outputs:
            a.check_layer(layer)
        tree = None if self.remote else self._tree(run, wanted)
        for site in wanted:
            shape = self._check_site(site, batch, pos, tree)
            if site.layer is not None and site.layer < run.start:
                raise ValueError(f"site {site} lies below the run's start layer {run.start}: it is not computed")
            if site.layer in run.attn_outputs and site.kind in inside_attn:
                raise ValueError(f"site {site} lies in an attention module this run skips (attn_outputs)")
            for w in writes.get(site, ()):
                self._check_write(w, site, shape)
        for layer, value in run.attn_outputs.items():
            if tuple(value.shape) != (batch, pos, a.d_model):
                raise ValueError(f"attn_outputs[{layer}] has shape {tuple(value.shape)}; expected {(batch, pos, a.d_model)}")
        returns = check_returns(run.returns, batch, pos, a.vocab_size)
        # remote=True: the server runs its own model (a hub-id wrapper's meta model is in training mode)
        here = self.remote is not True and _dropout_active(inner)
        with _eval_mode(inner) if here else contextlib.nullcontext():
            if verify and not self.remote:  # remotely: see interventions.engine.remote
                for site in writes:
                    self._verify(site)
                    if site.kind in ("q", "k", "v") and any(w.head is not None for w in writes[site]):
                        self._verify_heads(site)
            return self._trace(tree, tokens, run, reads, writes, returns, narrow)

    def _check_remotable(self, reads: list[Site], writes: dict[Site, list[Write]]) -> None:
        """Refuse, before anything is sent, what cannot run on a server (``interventions.engine.remote``)."""
        for site in list(reads) + list(writes):
            if site.kind == "pattern":
                raise NotRemotable(f"site {site} cannot run remotely: attention patterns need observable(), which "
                                   "adds a module to every attention layer and switches the attention implementation; "
                                   "a server's model is shared and cannot be edited. Read z, q, k or v instead, or run "
                                   "locally")
        for site, ws in writes.items():
            for w in ws:
                if callable(w.value) and not torch.is_tensor(w.value):
                    raise NotRemotable(f"write to {site}: a function as the written value cannot run remotely (it "
                                       "would run on the server, which has neither this package nor your code): "
                                       "compute the replacement here and write a tensor")
        warn_unproven(self.adapter)

    def _verify(self, site: Site) -> None:
        """Prove once per model and (layer, kind) that the forward consumes a write there: NaN written
        at the site on a 2-token input must reach the logits, or (attention kernels treat NaN scores as
        masked) a random perturbation of the site must change them."""
        key = (id(self.adapter.spec), site.layer, site.kind)
        done = _VERIFIED.get(self.inner)
        if done is not None and key in done:
            return
        probe = torch.arange(2)[None] % self.adapter.vocab_size
        nan = self.run(Run(probe, writes=[Write(site, lambda x: torch.full_like(x, float("nan")))]), verify=False)
        if not bool(torch.isnan(nan.logits).any()):
            # q/k/v/pattern feed the same layer's z: compare that (a head with no output path to the
            # logits still consumes them); other sites: the logits.
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, self.adapter.vocab_size, (1, min(8, self.adapter.n_ctx or 8)), generator=g)
            reads = [Site(site.layer, "z")] if site.kind in ("q", "k", "v", "pattern") else []

            def noise(x):
                return x + (1 + x.abs()) * torch.randn(x.shape, generator=g).to(x.device, x.dtype)

            clean = self.run(Run(tokens, reads=reads), verify=False)
            moved = self.run(Run(tokens, reads=reads, writes=[Write(site, noise)]), verify=False)
            same = all(torch.equal(clean.acts[k], moved.acts[k]) for k in clean.acts) if reads else \
                torch.equal(clean.logits, moved.logits)
            if same:
                raise InterventionError(f"a write to {site} did not take effect: the model's forward does not consume "
                                        f"{self.adapter.point(site, self.inner)} as the site's value; fix the adapter "
                                        "with interventions.register_adapter")
        _VERIFIED.setdefault(self.inner, set()).add(key)

    def _verify_heads(self, site: Site) -> None:
        """Prove once per model and (layer, kind) that a write to one head of q, k or v reaches only the
        query heads that read it: noise written to (kv) head j, in its own row of one batched run, must
        leave the ``z`` of every query head that does not read j as it was. A model that mixes heads after
        the site's point (OLMo2's q_norm / k_norm normalize all heads' queries / keys together, after
        q_proj / k_proj), or lays its heads out otherwise than the adapter reads them (a fused projection
        registered with the wrong ``fused_qkv``, e.g. CodeGen's blocks of [q | v | k]), fails: a per-head
        write or patch there would silently change other heads."""
        key = (id(self.adapter.spec), site.layer, site.kind, "heads")
        done = _VERIFIED.get(self.inner)
        if done is not None and key in done:
            return
        a = self.adapter
        # built-in adapters too: a model renamed to a built-in type (an OLMo2 as "llama") has its module paths
        n = a.n_site_heads(site.kind)
        reads = [h if site.kind == "q" else kv_head_of(h, a.n_heads, a.n_kv_heads) for h in range(a.n_heads)]
        if n > 1:
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, a.vocab_size, (1, min(8, a.n_ctx or 8)), generator=g).repeat(n + 1, 1)
            z = Site(site.layer, "z")

            def noise(x):
                return x + (1 + x.abs()) * torch.randn(x.shape, generator=g).to(x.device, x.dtype)

            # row 0 clean, row j + 1 with (kv) head j's value changed
            acts = self.run(Run(tokens, reads=[z], writes=[Write(site, noise, rows=j + 1, head=j) for j in range(n)],
                                returns="none"), verify=False).acts[str(z)]
            change = (acts[1:] - acts[:1]).abs().amax(dim=(1, 3))  # (written head, query head)
            tol = rounding_tolerance(acts)
            for j in range(n):
                others = [h for h in range(a.n_heads) if reads[h] != j and float(change[j, h]) > tol]
                if not others:
                    continue
                path = a.point(site, self.inner)[0]
                attn = module_at(self.inner, a.path(site.layer, "attn"))
                norms = [f"{c}_proj='{c}_norm'" for c in "qk" if isinstance(getattr(attn, f"{c}_norm", None), nn.Module)]
                if norms:
                    fix = (f"the module after which the heads are separate: interventions.register_adapter("
                           f"{a.model_type!r}, ArchSpec(..., {', '.join(norms)})) (this attention module's own norms)")
                elif a.spec.fused_qkv:
                    fix = (f"a layout that matches the projection: ArchSpec(fused_qkv={a.spec.fused_qkv!r}) reads "
                           + ("[q | k | v] along the last dimension" if a.spec.fused_qkv == "gpt2" else
                              "[q_h | k_h | v_h] per head") + ", which this projection's output is not")
                else:
                    fix = "the module after which the heads are separate: ArchSpec(q_proj=..., k_proj=..., v_proj=...)"
                what = "kv head" if site.kind in KV_KINDS else "head"
                raise InterventionError(
                    f"a write to one {what} of {site} reaches other heads (query heads {others} changed by a write to "
                    f"{what} {j}): this {a.model_type} model mixes heads after {path!r}, where the site is read "
                    f"(OLMo2's q_norm / k_norm normalize all heads together), or lays them out otherwise than the "
                    f"adapter reads them, so a per-head write or patch there would silently change other heads. "
                    f"Read the site at {fix}; or write every head at once (head=None)")
        _VERIFIED.setdefault(self.inner, set()).add(key)

    def _plan(self, run: Run, reads: list[Site], writes: dict[Site, list[Write]],
              tree: _Tree | None = None, narrow: dict | None = None) -> list[tuple]:
        """The run as plain data, in execution order: ``("skip", path, value, as_tuple, device)`` (a
        module not run, its output given; device None: the module's own, read in the trace) and
        ``("point", path, io, entries)`` with entries ``(view_spec, [(index, value)], read, label)``, read
        None or ``(name, head index or None, mean over rows)`` (sites at one module point, e.g. fused
        q/k/v, share one access). Paths are dotted module paths (with a ``tree``, its cached module points).
        ``narrow``: {site: (head index, mean)} of the reads given as ``Read``."""
        a, inner = self.adapter, self.inner
        remote = bool(self.remote)

        def point(site: Site) -> tuple[str, str]:
            return a.point(site, inner) if tree is None else tree.point(a, site, inner)

        def here(path: str):  # the device a tensor fed to this module goes to (remote: the server's)
            return None if remote else self.device(path)

        read_set = set(reads)
        by_layer: dict[int | None, list[Site]] = {}
        for site in set(reads) | set(writes):
            by_layer.setdefault(site.layer, []).append(site)
        order = {k: i for i, k in enumerate(LAYER_KINDS)}
        plan: list[tuple] = []

        def visit(sites: list[Site]) -> None:
            for site in sorted(sites, key=lambda s: order.get(s.kind, len(order))):
                path, io = point(site)
                read = (str(site), *(narrow or {}).get(site, (None, False))) if site in read_set else None
                entry = (a.view_spec(site.kind), [(w.index(site.kind), w.value) for w in writes.get(site, ())],
                         read, str(site))
                if plan and plan[-1][0] == "point" and plan[-1][1] == path and plan[-1][2] == io:
                    plan[-1][3].append(entry)
                else:
                    plan.append(("point", path, io, [entry]))

        tuple_out = a.spec.block_output == "tuple"
        prefix = run.prefix
        if prefix is not None and Site(run.start, "resid_pre") in writes:
            # the start block's input *is* the prefix (``.to`` keeps the object on its own device):
            # a write there, made in place, would edit the caller's tensor (and every later run given it)
            prefix = prefix.clone()
        for layer in range(a.n_layers):
            if layer < run.start:  # every skipped block passes the prefix on (only the last one's counts)
                plan.append(("skip", a.path(layer, "layer"), prefix, tuple_out, here(a.path(run.start, "layer"))))
                continue
            sites = by_layer.get(layer, [])
            if layer in run.attn_outputs:
                visit([s for s in sites if s.kind == "resid_pre"])
                attn = a.path(layer, "attn")
                plan.append(("skip", attn, run.attn_outputs[layer], True, here(attn)))
                visit([s for s in sites if s.kind != "resid_pre"])
            else:
                visit(sites)
        visit(by_layer.get(None, []))
        return plan

    def _trace(self, tree: _Tree | None, tokens, run: Run, reads: list[Site], writes: dict[Site, list[Write]],
               returns, narrow: dict | None = None) -> Result:
        from nnsight.intervention.interleaver import OutOfOrderError

        plan = self._plan(run, reads, writes, tree, narrow)
        by_path = bool(self.remote)  # modules named by path (the body finds them), else given as envoys
        if by_path:  # tensors stay here (the server places them); the wrapper names the server's model
            lm, trace_kwargs = self.model, {"remote": self.remote}
            plan = [(step[0], _parts(step[1]), *step[2:]) for step in plan]
            plan, returns = compact((plan, returns))
        else:  # each module's envoy, looked up here (the body's own look-ups cost ~1 us per path part)
            lm, trace_kwargs = tree.lm, {}
            plan = [(step[0], tree.envoy(step[1]), *step[2:]) for step in plan]
            tokens = tokens.to(self.device())
        kwargs = {"use_cache": False}
        if run.attention_mask is not None:
            kwargs["attention_mask"] = run.attention_mask.to(tokens.device).long()
            kwargs["position_ids"] = position_ids(run.attention_mask, tokens)
        if self.remote:  # a chunk of a batch is a view: send it, not the whole batch
            tokens, kwargs = compact((tokens, kwargs))
        try:
            result, acts = _traced(lm, tokens, kwargs, trace_kwargs, by_path, plan, returns)
        except OutOfOrderError as e:
            raise InterventionError(f"an intervention's target did not run ({e}). Pattern sites need "
                                    "`with interventions.observable(model):`; module paths come from "
                                    "interventions.engine.adapters (fix with register_adapter)") from None
        if returns in ("logits", "none"):
            return Result(result, acts)
        if returns == "loss":
            return Result(None, acts, loss=result)
        return Result(None, acts, gathered=result)


def _traced(lm, tokens, kwargs, trace_kwargs, by_path, plan, returns, is_instance=isinstance,
           tensor=torch.Tensor):
    """Open the nnsight trace and run the plan in it: the one ``with ....trace`` of the package.

    This is what a server runs: the body reads only these arguments, torch and nnsight (no code of this
    package: a server does not have it), and its results live in containers made inside the trace
    (only saved values come back from a server). A function of its own, because nnsight runs the
    block against a snapshot of the enclosing frame's locals and writes them back after: a frame
    holding only the body's inputs costs ~25 us less per trace than the engine's (and builtins bound
    as defaults skip the block scope's failing global look-ups)."""
    import nnsight
    result = None
    with lm.trace(tokens, **trace_kwargs, **kwargs):
        acts = nnsight.save({})
        for step in plan:
            env = step[1]
            if by_path:
                env = lm
                for part in step[1]:
                    env = env[part] if is_instance(part, int) else getattr(env, part)
            if step[0] == "skip":
                value, as_tuple, device = step[2], step[3], step[4]
                if device is None:
                    x = env.input
                    device = x.device
                value = value.to(device)
                env.skip((value, None) if as_tuple else value)
                continue
            raw = env.input if step[2] == "input" else env.output
            if not is_instance(raw, tensor):
                raw = raw[0]
            for (lo, hi, shape, pick), site_writes, read, label in step[3]:
                view = raw if lo is None else raw[..., lo:hi]
                if shape is not None:
                    view = view.view(raw.shape[0], raw.shape[1], *shape)
                if pick is not None:
                    view = view[:, :, :, pick]
                for idx, value in site_writes:
                    if value is None:
                        view[idx] = 0
                        continue
                    if not is_instance(value, tensor):  # a function of the activation (local runs)
                        current = view[idx].clone()
                        value = value(current)
                        if not is_instance(value, tensor) or value.shape != current.shape:
                            got = (tuple(value.shape) if is_instance(value, tensor) else type(value).__name__)
                            raise ValueError(f"a function written to {label} returned {got}; it must return "
                                             f"a tensor of the activation's shape {tuple(current.shape)}")
                        if not value.is_floating_point() or value.is_meta:
                            got = "a meta tensor" if value.is_meta else f"dtype {value.dtype}"
                            raise ValueError(f"a function written to {label} returned {got}; it must return "
                                             "floating-point values with data (e.g. computed from the activation "
                                             "it is given)")
                    view[idx] = value.to(device=view.device, dtype=view.dtype)
                if read is not None:
                    name, heads, mean = read
                    if heads is not None:
                        got = view[heads]  # a list index copies
                    else:
                        got = view if mean else view.clone()
                    acts[name] = got.mean(0) if mean else got
        if returns != "none":
            # the model's logits, not its unembedding's output: a forward may change them after it (Cohere's
            # logit scale, Gemma 2's final softcap); without a loss the first field of HF's output is the logits
            out = lm.output
            if not is_instance(out, tensor):
                out = out[0]
            if returns == "logits":
                result = out.save()
            elif returns == "loss":  # as interventions.primitives.loss.loss_from_logits
                logp = out[:, :-1].float().log_softmax(-1)
                result = (-logp.gather(-1, tokens[:, 1:, None].to(out.device)).squeeze(-1)).save()
            else:
                pos, ids = returns
                if is_instance(pos, tuple):  # (rows, positions): one position per row
                    picked = out[pos[0].to(out.device), pos[1].to(out.device)]
                else:
                    picked = out[:, pos]
                result = picked.float().gather(-1, ids.to(out.device)).save()
    return result, acts


def _parts(path: str) -> tuple:
    """A dotted module path as the trace body walks it: attribute names and list indices."""
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def check_returns(returns, batch: int, pos: int, vocab_size: int):
    """``Run.returns`` validated, as the trace body takes it: "logits", "loss", "none" or (pos, ids (batch, n))
    (pos an int, or (rows, positions) tensors);
    ids outside the vocabulary are refused here (in the trace, remotely, they would fail only on the server)."""
    if isinstance(returns, str) and returns in ("logits", "loss", "none"):
        return returns
    if not isinstance(returns, Gather):
        raise ValueError(f"returns={returns!r} is unknown: use 'logits', 'loss', 'none' or Gather(pos, ids)")
    where = returns.pos
    if torch.is_tensor(where) and where.dim() > 0:  # one position per row: the trace indexes logits[rows, where]
        if where.shape != (batch,) or where.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Gather pos must be an int or a (batch={batch},) tensor of integer positions, got "
                             f"shape {tuple(where.shape)} and dtype {where.dtype}")
        lo, hi = (int(v) for v in torch.aminmax(where))
        if lo < -pos or hi >= pos:
            raise ValueError(f"Gather pos holds {lo if lo < -pos else hi}, out of range for {pos} positions")
        where = (torch.arange(batch), where.long().cpu())
    else:
        where = check_position(where, pos, "Gather pos",
                               several=f"or a (batch={batch},) tensor of positions, one per row")
    ids = torch.as_tensor(returns.ids).long()
    if ids.dim() == 1:
        ids = ids[None].expand(batch, -1)
    if ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"Gather ids must have shape (n,) or (batch={batch}, n), got {tuple(ids.shape)}")
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"Gather ids outside the vocabulary [0, {vocab_size}) (min {lo}, max {hi}): pass token "
                             "ids of this model's tokenizer")
    return where, ids


def compact(obj, _memo: dict | None = None):
    """``obj`` (nested tuples, lists, dicts and tensors) with every tensor that views a larger storage copied
    to a compact one, each object once (so a tensor used twice is still one object and pickles once).
    Pickling a view ships its whole storage: k head slices of one activation would ship it k times."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            big = obj.untyped_storage().nbytes() > obj.numel() * obj.element_size()
            memo[id(obj)] = (obj, obj.clone() if big else obj)  # keep obj alive: ids stay unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(compact(x, memo) for x in obj)
    if isinstance(obj, list):
        return [compact(x, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: compact(v, memo) for k, v in obj.items()}
    return obj


def execute(model, run: Run, remote: Remote = False) -> Result:
    """Execute one ``Run`` on ``model`` (an HF causal LM of a supported architecture, or its nnsight
    wrapper; ``remote``: see ``Engine``). Returns ``Result(logits (batch, pos, vocab), acts {site name:
    tensor})`` (``loss`` / ``gathered`` instead of the logits when the run returns them), every tensor
    of a local run on ``output_device(model)`` (the model's first parameter's device; ``Engine.run``
    leaves each on the device that computed it)."""
    result = Engine(model, remote).run(run)
    return result if remote else gathered(result, output_device(unwrap(model)))


def gathered(result: Result, device: torch.device) -> Result:
    """``result`` with its tensors on ``device`` (no copy where they already are)."""
    def to(x):
        return None if x is None else x.to(device)

    return Result(to(result.logits), {k: v.to(device) for k, v in result.acts.items()}, to(result.loss),
                  to(result.gathered))


def wrap(model, tokenizer=None):
    """The escape hatch to raw nnsight: a bare ``nnsight.NNsight`` over ``model`` (token-id inputs), or
    with a ``tokenizer`` an ``nnsight.TransformersModel`` (string prompts, several invokes per trace).

    An nnsight model (``NNsight``, ``TransformersModel``, ``LanguageModel``) is returned as it is, except
    that a bare ``NNsight`` given a ``tokenizer`` becomes a ``TransformersModel`` over the same model with
    it; a wrapper keeping another tokenizer is refused (``ValueError``: pass the HF model itself).

    Module paths of every site come from ``get_adapter(model).point(site)``.

    Example:
        >>> import torch
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=20)).eval()
        >>> lm = wrap(model)
        >>> with lm.trace(torch.zeros(1, 4, dtype=torch.long)):
        ...     z = lm.transformer.h[0].attn.c_proj.input.save()
        >>> z.shape
        torch.Size([1, 4, 16])
        >>> wrap(lm) is lm
        True
        >>> from interventions.zoo.tokenizer import byte_tokenizer
        >>> type(wrap(lm, byte_tokenizer())).__name__  # the same model, now taking string prompts
        'TransformersModel'
    """
    import nnsight

    if isinstance(model, nnsight.Envoy):  # NNsight, TransformersModel, LanguageModel (not NNsight subclasses)
        if tokenizer is None or getattr(model, "tokenizer", None) is tokenizer:
            return model
        if type(model) is not nnsight.NNsight:
            raise ValueError(f"wrap: this {type(model).__name__} keeps its own tokenizer, not the one given: pass "
                             "the HF model itself, wrap(hf_model, tokenizer)")
        model = unwrap(model)
    if tokenizer is None:
        return nnsight.NNsight(model)
    return nnsight.TransformersModel(model, tokenizer=tokenizer)


def kv_map(model) -> list[int]:
    """Query head -> key/value head of every query head (identity without grouped-query attention)."""
    a = get_adapter(unwrap(model))
    return [kv_head_of(h, a.n_heads, a.n_kv_heads) for h in range(a.n_heads)]
