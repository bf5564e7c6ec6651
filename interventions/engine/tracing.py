"""The one trace engine: a run described as data, executed by one driver.

A ``Run`` says what to read (sites), what to write (``Write``: a site, optionally restricted to batch
rows, one head and a position, and the value: a tensor, ``None`` for zero, or a function of the current
activation), and which layers the caller already computed (``start`` / ``prefix``: blocks below
``start`` are skipped and their output replaced; ``attn_outputs``: an attention module skipped and its
output given). ``execute(model, run)`` is the only place in the package that opens an nnsight trace.
It owns, for every primitive alike:

* execution order (sites visited in the order of ``interventions.engine.sites.LAYER_KINDS``),
* attention mask and position ids of padded batches (each real token at its unpadded position),
* ``use_cache=False``, and eval mode (a model left in training mode with active dropout runs in eval
  mode, with a warning, and is put back),
* placement of each written tensor on its site's device and dtype (multi-device models),
* error translation by exception type (nnsight's ``OutOfOrderError``: a target that never ran),
* a take-effect check: the first write to a (layer, kind) of a model is probed once by writing NaN
  there on a 2-token input and requiring NaN in the logits (or, where an attention kernel masks NaN
  scores, a changed logit under a random perturbation), which proves the forward *consumes* the site
  (not just that the tensor was written).

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
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter, get_adapter, has_pattern_site, module_at
from .sites import HEAD_KINDS, KV_KINDS, LAYER_KINDS, RESID_KINDS, Site, kv_head_of, parse_site


class InterventionError(RuntimeError):
    """An intervention could not be applied (its target did not run, or the forward ignored it)."""


Value = torch.Tensor | None | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Write:
    """Write ``value`` into ``site`` (``"L1.z"`` or ``Site``), at batch ``rows``, head ``head`` (query head
    for q / z / pattern, key/value head for k / v) and position ``pos`` (the query position for a
    pattern); ``None`` for any of them means all.

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


@dataclass
class Run:
    """One forward pass described as data (see the module docstring)."""

    tokens: torch.Tensor  # (batch, pos)
    reads: Sequence[Site | str] = ()
    writes: Sequence[Write] = ()
    attention_mask: torch.Tensor | None = None  # (batch, pos), 1 = real token
    start: int = 0  # blocks below are skipped ...
    prefix: torch.Tensor | None = None  # ... and the residual entering block ``start`` is this (batch, pos, d_model)
    attn_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> attention output (batch, pos, d_model)


@dataclass
class Result:
    logits: torch.Tensor  # (batch, pos, vocab)
    acts: dict[str, torch.Tensor]  # site name -> activation in the site's shape (after that site's writes)


# ----------------------------------------------------------------------------- input validation

def unwrap(model):
    """The torch module under an nnsight wrapper (or the model itself)."""
    return getattr(model, "_module", model)


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
        raise ValueError(f"{name} must be a torch.LongTensor of shape (batch, pos), got {type(tokens).__name__}")
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
    lo, hi = (int(v) for v in torch.aminmax(tokens))
    if lo < 0 or hi >= adapter.vocab_size:
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {adapter.vocab_size}) (min {lo}, max {hi}): "
                         "tokenise with this model's tokenizer")
    _last_valid = (weakref.ref(tokens), tokens._version, adapter.vocab_size, adapter.n_ctx)
    return tokens


def check_mask(attention_mask: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """An attention mask must match the tokens' shape and hold 0/1 (1 = real token)."""
    if attention_mask is None:
        return
    if not torch.is_tensor(attention_mask) or attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must be a tensor of the tokens' shape {tuple(tokens.shape)}, got "
                         f"{tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")


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


def check_positive(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer" + (" or None" if allow_none else ""))


# ----------------------------------------------------------------------------- the engine

# model -> {(spec, layer, kind)} whose consumption by the forward was proven (weak keys: no reference)
_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _dropout_active(inner: nn.Module) -> bool:
    if not inner.training:
        return False
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in inner.modules()):
        return True
    c = getattr(inner, "config", None)
    return any(float(getattr(c, name, 0) or 0) > 0 for name in ("attention_dropout", "attn_pdrop"))


@contextlib.contextmanager
def _eval_mode(inner: nn.Module):
    """Run in eval mode if dropout would otherwise make the run random; restore the modes after."""
    if not _dropout_active(inner):
        yield
        return
    warnings.warn("the model is in training mode with dropout: running it in eval mode for this call "
                  "(call model.eval() to silence this)", stacklevel=4)
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
    """Executes runs on one model; build one per primitive call."""

    def __init__(self, model):
        self.inner = unwrap(model)
        self.adapter = get_adapter(self.inner)
        self._first = None  # the model's first parameter (moving a model keeps its parameter objects)

    def _tree(self, run: Run, sites) -> _Tree:
        """The model's cached ``_Tree``, rebuilt unless it wraps the modules a run touches as they are now."""
        tree = _TREES.get(self.inner)
        if tree is None or not tree.holds(self.inner, self._touched(tree, run, sites)):
            tree = _Tree(self.inner)
            _TREES[self.inner] = tree
        return tree

    def device(self, path: str | None = None) -> torch.device:
        """Device of the module at ``path`` (its first parameter), else of the model's first parameter:
        a tensor fed to a module goes to that module's device (multi-device models)."""
        if path is not None:
            p = next(module_at(self.inner, path).parameters(), None)
            if p is not None:
                return p.device
        if self._first is None:
            self._first = next(self.inner.parameters())
        return self._first.device

    # ------------------------------------------------------------------ validation
    def _check_site(self, site: Site, batch: int, pos: int, tree: _Tree) -> tuple[int, ...]:
        """The site's full shape; raises if it does not exist on this model."""
        a = self.adapter
        if site.kind == "pattern" and not has_pattern_site(self.inner):
            raise InterventionError(f"site {site}: attention patterns are not observable on this model's "
                                    "attention path (SDPA/flash computes no pattern): run inside "
                                    "`with interventions.observable(model):`")
        if tree.adapter is not a or site not in tree.sites:
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
                raise ValueError(f"site {site} does not exist: this {a.model_type} model has no MLP at {path!r} "
                                 "(attention-only); use attn_out or resid_post") from None
            raise InterventionError(f"site {site}: this {a.model_type} model has no module at {path!r}: fix the "
                                    "adapter with interventions.register_adapter") from None

    def _check_write(self, w: Write, site: Site, full: tuple[int, ...]) -> tuple[int, ...]:
        a = self.adapter
        if w.head is not None:
            if site.kind in RESID_KINDS:
                raise ValueError(f"write to {site}: the site has no heads; drop head={w.head}")
            n = a.n_site_heads(site.kind)
            if not isinstance(w.head, int) or not 0 <= w.head < n:
                what = "kv head" if site.kind in KV_KINDS else "head"
                extra = (f" (grouped-query attention: query head h reads kv head h // {a.n_heads // a.n_kv_heads})"
                         if site.kind in KV_KINDS and a.n_kv_heads != a.n_heads else "")
                raise ValueError(f"write to {site}: {what} {w.head!r} out of range: layer {site.layer} has "
                                 f"{what}s 0-{n - 1}{extra}")
        try:
            shape = indexed_shape(full, w.index(site.kind))
        except IndexError as e:
            raise ValueError(f"write to {site}: rows/pos {w.rows}/{w.pos} do not index a site of shape {full}: {e}") from None
        if torch.is_tensor(w.value):
            try:
                ok = torch.broadcast_shapes(tuple(w.value.shape), shape) == shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"write to {site}: a value of shape {tuple(w.value.shape)} does not fit the written "
                                 f"part {shape} of the site (full shape {full}); see interventions.engine.sites")
        elif w.value is not None and not callable(w.value):
            raise ValueError(f"write to {site}: value must be a tensor, None (zero) or a function of the current "
                             f"activation, got {type(w.value).__name__}")
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
        reads = [parse_site(s, a.n_layers) for s in run.reads]
        writes: dict[Site, list[Write]] = {}
        for w in run.writes:
            if not isinstance(w, Write):
                raise ValueError(f"writes must be Write objects, got {type(w).__name__}")
            writes.setdefault(parse_site(w.site, a.n_layers), []).append(w)
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
        tree = self._tree(run, wanted)
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
        with _eval_mode(inner) if _dropout_active(inner) else contextlib.nullcontext():
            if verify:
                for site in writes:
                    self._verify(site)
            return self._trace(tree, tokens, run, reads, writes)

    def _touched(self, tree: _Tree, run: Run, sites) -> list[str]:
        """Module paths a run reads, writes or skips, and the unembedding's (whose output it saves)."""
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

    def _trace(self, tree: _Tree, tokens, run: Run, reads: list[Site], writes: dict[Site, list[Write]]) -> Result:
        from nnsight.intervention.interleaver import OutOfOrderError

        a, inner = self.adapter, self.inner
        lm = tree.lm
        device = self.device()
        tokens = tokens.to(device)
        kwargs = {"use_cache": False}
        if run.attention_mask is not None:
            kwargs["attention_mask"] = run.attention_mask.to(device).long()
            kwargs["position_ids"] = position_ids(run.attention_mask, tokens)
        wanted = set(reads) | set(writes)
        by_layer: dict[int | None, list[Site]] = {}
        for site in wanted:
            by_layer.setdefault(site.layer, []).append(site)
        order = {k: i for i, k in enumerate(LAYER_KINDS)}
        saved: dict[str, torch.Tensor] = {}
        read_set = set(reads)

        def visit(sites: list[Site]) -> None:
            cache: dict[tuple[str, str], torch.Tensor] = {}  # one access per module point (fused q/k/v)
            for site in sorted(sites, key=lambda s: order.get(s.kind, len(order))):
                point = tree.point(a, site, inner)
                if point not in cache:
                    env = tree.envoy(point[0])
                    raw = env.input if point[1] == "input" else env.output
                    cache[point] = raw if torch.is_tensor(raw) else raw[0]
                view = a.view(cache[point], site.kind)
                for w in writes.get(site, ()):
                    idx = w.index(site.kind)
                    if w.value is None:
                        view[idx] = 0
                        continue
                    value = w.value
                    if callable(value) and not torch.is_tensor(value):
                        current = view[idx].clone()
                        value = value(current)
                        if not torch.is_tensor(value) or value.shape != current.shape:
                            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                            raise ValueError(f"a function written to {site} returned {got}; it must return a "
                                             f"tensor of the activation's shape {tuple(current.shape)}")
                    view[idx] = value.to(device=view.device, dtype=view.dtype)
                if site in read_set:
                    saved[str(site)] = view.clone().save()

        def body():
            for layer in range(a.n_layers):
                if layer < run.start:  # every skipped block passes the prefix on (only the last one's counts)
                    p = run.prefix.to(self.device(a.path(run.start, "layer")))
                    tree.envoy(a.path(layer, "layer")).skip((p, None) if a.spec.block_output == "tuple" else p)
                    continue
                sites = by_layer.get(layer, ())
                if layer in run.attn_outputs:
                    visit([s for s in sites if s.kind == "resid_pre"])
                    out = run.attn_outputs[layer].to(self.device(a.path(layer, "attn")))
                    tree.envoy(a.path(layer, "attn")).skip((out, None))
                    visit([s for s in sites if s.kind != "resid_pre"])
                elif sites:
                    visit(sites)
            if None in by_layer:
                visit(by_layer[None])
            return tree.envoy(tree.point(a, FINAL, inner)[0]).output.save()

        try:
            # nnsight compiles the block's source and runs it with its variables in a scope object: one
            # call keeps that to a few look-ups (the loop above runs as ordinary Python)
            with lm.trace(tokens, **kwargs):
                logits = body()
        except OutOfOrderError as e:
            raise InterventionError(f"an intervention's target did not run ({e}). Pattern sites need "
                                    "`with interventions.observable(model):`; module paths come from "
                                    "interventions.engine.adapters (fix with register_adapter)") from None
        return Result(logits, saved)


def execute(model, run: Run) -> Result:
    """Execute one ``Run`` on ``model`` (an HF causal LM of a supported architecture, or its nnsight
    wrapper). Returns ``Result(logits (batch, pos, vocab), acts {site name: tensor})``."""
    return Engine(model).run(run)


def wrap(model, tokenizer=None):
    """The escape hatch to raw nnsight: a bare ``nnsight.NNsight`` over ``model`` (token-id inputs), or
    with a ``tokenizer`` an ``nnsight.TransformersModel`` (string prompts, several invokes per trace).

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
    """
    import nnsight

    if isinstance(model, nnsight.NNsight):
        return model
    if tokenizer is None:
        return nnsight.NNsight(model)
    return nnsight.TransformersModel(model, tokenizer=tokenizer)


def kv_map(model) -> list[int]:
    """Query head -> key/value head of every query head (identity without grouped-query attention)."""
    a = get_adapter(unwrap(model))
    return [kv_head_of(h, a.n_heads, a.n_kv_heads) for h in range(a.n_heads)]
