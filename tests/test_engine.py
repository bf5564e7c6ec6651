"""The one trace engine: every site read and written on every architecture, checked against plain
torch hooks at module paths written out here (independently of ``interventions.engine.adapters``);
per-head q/k/v patching under grouped-query attention; bad input; no references kept to models."""

import gc
import weakref

import numpy as np
import pytest
import torch

from interventions import InterventionError, observable, patch_heads, run_with_cache
from interventions.engine.sites import LAYER_KINDS, Site, kv_head_of, parse_site
from interventions.engine.tracing import Read, Run, Write, execute

from .test_ablation import ARCH_NAMES, VOCAB, build

POS = 7
# Module paths per architecture, written out independently of the adapters.
PATHS = {
    "attn_only": dict(block="transformer.h.{}", attn="transformer.h.{}.attn", o="transformer.h.{}.attn.c_proj",
                      qkv=("transformer.h.{}.attn.q_proj", "transformer.h.{}.attn.k_proj",
                           "transformer.h.{}.attn.v_proj"), mlp=None, head="lm_head"),
    "gpt2": dict(block="transformer.h.{}", attn="transformer.h.{}.attn", o="transformer.h.{}.attn.c_proj",
                 qkv="transformer.h.{}.attn.c_attn", mlp="transformer.h.{}.mlp", head="lm_head"),
    "gpt_neox": dict(block="gpt_neox.layers.{}", attn="gpt_neox.layers.{}.attention",
                     o="gpt_neox.layers.{}.attention.dense", qkv="gpt_neox.layers.{}.attention.query_key_value",
                     mlp="gpt_neox.layers.{}.mlp", head="lm_head"),
}
for _arch in ("llama", "qwen2", "mistral"):
    PATHS[_arch] = dict(block="model.layers.{}", attn="model.layers.{}.self_attn", o="model.layers.{}.self_attn.o_proj",
                        qkv=tuple(f"model.layers.{{}}.self_attn.{p}_proj" for p in "qkv"),
                        mlp="model.layers.{}.mlp", head="lm_head")
N_HEADS, D_HEAD, N_KV = 4, 8, {"llama": 2, "qwen2": 2, "mistral": 2}


def _module(model, path):
    return model.get_submodule(path)


def _qkv(arch, model, layer, raw_outputs, kind):
    """(batch, pos, heads, d_head) of q, k or v from the raw projection output(s), by hand."""
    n_kv = N_KV.get(arch, N_HEADS)
    i = "qkv".index(kind)
    if arch == "gpt2":
        x = raw_outputs[0][..., i * 32:(i + 1) * 32]
        return x.reshape(*x.shape[:2], N_HEADS, D_HEAD)
    if arch == "gpt_neox":
        x = raw_outputs[0]
        return x.reshape(*x.shape[:2], N_HEADS, 3, D_HEAD)[:, :, :, i]
    x = raw_outputs[i]
    return x.reshape(*x.shape[:2], N_HEADS if kind == "q" else n_kv, D_HEAD)


@torch.no_grad()
def _hooked(arch, model, tokens, layer=1, edit=None):
    """Plain-torch forward recording every site of ``layer``; ``edit(kind, tensor) -> tensor`` may
    replace the q/k/v projection output (raw layout)."""
    p = {k: (v.format(layer) if isinstance(v, str) else v) for k, v in PATHS[arch].items()}
    rec, handles = {}, []

    def pre(name):
        def hook(mod, args, kwargs):
            rec[name] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    def post(name):
        def hook(mod, args, out):
            x = out if torch.is_tensor(out) else out[0]
            if edit is not None and name.startswith("raw"):
                x = edit(name, x)
                rec[name] = x.clone()
                return x if torch.is_tensor(out) else (x, *out[1:])
            rec[name] = x.clone()
        return hook

    handles.append(_module(model, p["block"]).register_forward_pre_hook(pre("resid_pre"), with_kwargs=True))
    handles.append(_module(model, p["block"]).register_forward_hook(post("resid_post")))
    handles.append(_module(model, p["o"]).register_forward_pre_hook(pre("z"), with_kwargs=True))
    handles.append(_module(model, p["o"]).register_forward_hook(post("attn_out")))
    handles.append(_module(model, PATHS[arch]["head"]).register_forward_pre_hook(pre("final"), with_kwargs=True))
    if p["mlp"]:
        handles.append(_module(model, p["mlp"]).register_forward_hook(post("mlp_out")))
    qkv = p["qkv"] if isinstance(p["qkv"], tuple) else (p["qkv"],)
    for i, path in enumerate(qkv):
        handles.append(_module(model, path.format(layer)).register_forward_hook(post(f"raw{i}")))
    try:
        logits = model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    raws = [rec[f"raw{i}"] for i in range(len(qkv))]
    out = {kind: _qkv(arch, model, layer, raws, kind) for kind in "qkv"}
    out.update({k: rec[k] for k in ("resid_pre", "resid_post", "attn_out", "final") + (("mlp_out",) if p["mlp"] else ())})
    out["z"] = rec["z"].reshape(*rec["z"].shape[:2], N_HEADS, D_HEAD)
    return logits, out


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_site_matches_plain_hooks(arch):
    """run_with_cache returns, for every site of the vocabulary, exactly what plain torch hooks at the
    hand-written module paths see, in the documented shape (k/v with n_kv_heads under GQA), and the
    same logits as the model."""
    model = build(arch)
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    want_logits, want = _hooked(arch, model, tokens)
    kinds = [k for k in LAYER_KINDS if k != "pattern" and (k != "mlp_out" or arch != "attn_only")]
    logits, cache = run_with_cache(model, tokens, [f"L1.{k}" for k in kinds] + ["final"])
    torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
    for kind in kinds + ["final"]:
        name = "final" if kind == "final" else f"L1.{kind}"
        torch.testing.assert_close(cache[name], want[kind], atol=0, rtol=0, msg=f"{arch} {name}")
    n_kv = N_KV.get(arch, N_HEADS)
    assert cache["L1.k"].shape == (2, POS, n_kv, D_HEAD) and cache["L1.q"].shape == (2, POS, N_HEADS, D_HEAD)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "attn_only"])
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_per_head_qkv_patching_matches_plain_hooks(arch, kind):
    """patch_heads(site=q/k/v) equals replacing that (kv) head's slice of the projection output with
    the source run's in a plain forward hook; under GQA k/v are indexed by kv head."""
    model = build(arch)
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randint(0, VOCAB, (2, POS), generator=g), torch.randint(0, VOCAB, (2, POS), generator=g)

    def metric(logits, tokens):
        return logits[:, -1].log_softmax(-1)[torch.arange(len(tokens)), clean[:, -1]]

    got = patch_heads(model, clean, corrupted, metric, site=kind, heads_per_pass=3)
    n = N_KV.get(arch, N_HEADS) if kind in "kv" else N_HEADS
    assert got.shape == (2, n)
    raw_index = {"gpt2": 0, "gpt_neox": 0}.get(arch, "qkv".index(kind))
    for layer in range(2):
        _, src = _hooked(arch, model, clean, layer)
        for head in range(n):
            def edit(name, x):
                if name != f"raw{raw_index}":
                    return x
                x = x.clone()
                view = _qkv(arch, model, layer, [x] * 3, kind)  # a view of x in every layout
                view[:, :, head] = src[kind][:, :, head]
                return x
            logits, _ = _hooked(arch, model, corrupted, layer, edit)
            torch.testing.assert_close(got[layer, head], metric(logits, corrupted).mean(), atol=1e-5, rtol=0)
    base = metric(model(corrupted).logits, corrupted).mean()
    assert (got - base).abs().max() > 1e-4  # the patches matter


def test_kv_head_map():
    """Query head h of a 4-head, 2-kv-head model reads kv head h // 2 (HF's repeat_kv)."""
    assert [kv_head_of(h, 4, 2) for h in range(4)] == [0, 0, 1, 1]
    assert [kv_head_of(h, 4, 4) for h in range(4)] == [0, 1, 2, 3]


def test_patterns_and_writes_through_engine():
    """A pattern write inside observable takes effect, and a function write sees the current value."""
    model = build("llama")
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(2))
    with observable(model):
        uniform = torch.tril(torch.ones(POS, POS)) / torch.arange(1, POS + 1)[:, None]
        out = execute(model, Run(tokens, reads=["L0.pattern"], writes=[Write("L0.pattern", uniform, head=1)]))
        torch.testing.assert_close(out.acts["L0.pattern"][:, 1], uniform.expand(2, POS, POS))
    seen = []
    execute(model, Run(tokens, writes=[Write("L1.v", lambda v: seen.append(v.shape) or v, head=1)]))
    assert seen == [torch.Size([2, POS, D_HEAD])]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_narrowed_read_is_the_full_read_narrowed(arch):
    """Read(site, heads, mean_rows) returns exactly the full read's heads (in the order given; kv heads for
    k / v under grouped-query attention) and their mean over rows, with a write in the same run seen."""
    model = build(arch)
    tokens = torch.randint(0, VOCAB, (3, POS), generator=torch.Generator().manual_seed(4))
    writes = [Write("L1.z", None, head=1)]
    with observable(model):
        full = execute(model, Run(tokens, reads=["L0.z", "L1.z", "L1.k", "L0.pattern"], writes=writes)).acts
        got = execute(model, Run(tokens, reads=[Read("L0.z", heads=[3, 0]), Read("L1.z", heads=[1], mean_rows=True),
                                                Read("L1.k", heads=[1]), Read("L0.pattern", heads=(2,), mean_rows=True)],
                                 writes=writes)).acts
    assert torch.equal(got["L0.z"], full["L0.z"][:, :, [3, 0]])
    assert torch.equal(got["L1.z"], full["L1.z"][:, :, [1]].mean(0)) and not got["L1.z"].any()  # the write is seen
    assert torch.equal(got["L1.k"], full["L1.k"][:, :, [1]])
    torch.testing.assert_close(got["L0.pattern"], full["L0.pattern"][:, [2]].mean(0), rtol=0, atol=0)
    assert got["L0.pattern"].shape == (1, POS, POS)


@pytest.mark.parametrize("read, match", [
    (Read("L0.z", heads=[4]), r"heads in 0-3"),
    (Read("L0.z", heads=[]), r"non-empty list"),
    (Read("L0.z", heads=[True]), r"non-empty list"),
    (Read("L0.z", heads=1), r"non-empty list"),
    (Read("L0.k", heads=[2]), r"key/value heads in 0-1"),
    (Read("L0.resid_pre", heads=[0]), r"no head axis"),
    (Read("L0.z", mean_rows=1), r"True or False"),
])
def test_a_bad_read_raises_naming_the_fix(read, match):
    """Heads out of range (kv heads for k / v), not a list, on a site with no head axis, and a mean flag that
    is not a bool: a ValueError naming the fix, before any forward."""
    model = build("llama")  # 4 query heads, 2 key/value heads
    with pytest.raises(ValueError, match=match):
        execute(model, Run(torch.zeros(1, 4, dtype=torch.long), reads=[read]))


def test_a_narrowed_read_refuses_a_padded_mean_a_second_differing_read_and_a_bare_read():
    model = build("gpt2")
    tokens = torch.ones(2, 4, dtype=torch.long)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="pads would enter the mean"):
        execute(model, Run(tokens, reads=[Read("L0.z", mean_rows=True)], attention_mask=mask))
    for reads in (["L0.z", Read("L0.z", heads=[0])], [Read("L0.z", heads=[0]), "L0.z"],
                  [Read("L0.z", heads=[0]), Read("L0.z", heads=[1])]):
        with pytest.raises(ValueError, match="read twice, differently"):
            execute(model, Run(tokens, reads=reads))
    with pytest.raises(ValueError, match=r"pass a list, reads=\[Read"):
        execute(model, Run(tokens, reads=Read("L0.z")))
    same = execute(model, Run(tokens, reads=[Read("L0.z", heads=[0]), Read("L0.z", heads=[0])])).acts["L0.z"]
    assert same.shape == (2, 4, 1, 8)


# ----------------------------------------------------------------------------- bad input

def test_bad_sites_and_writes_raise_naming_the_fix():
    """Unknown sites, a site the architecture lacks, a kv head out of range, wrong value shapes and a
    custom ablation returning the wrong shape raise ValueError naming the fix; nothing is modified."""
    from interventions import FunctionAblation, run_with_ablations

    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, VOCAB, (2, POS))
    with pytest.raises(ValueError, match="L<layer>.<kind>"):
        parse_site("L0.hook_z")
    with pytest.raises(ValueError, match="layers 0-1"):
        execute(model, Run(tokens, reads=["L2.z"]))
    with pytest.raises(ValueError, match="kv heads 0-1.*grouped-query"):
        execute(model, Run(tokens, writes=[Write("L0.k", None, head=3)]))
    with pytest.raises(ValueError, match="does not fit"):
        execute(model, Run(tokens, writes=[Write("L0.z", torch.zeros(2, POS, 5), head=0)]))
    with pytest.raises(ValueError, match="no MLP"):
        execute(build("attn_only"), Run(tokens, reads=["L0.mlp_out"]))
    with pytest.raises(ValueError, match="must return a tensor of the activation's shape"):
        run_with_ablations(model, tokens, FunctionAblation("L0H0", lambda z, head: z[:, :1]))
    with pytest.raises(InterventionError, match="observable"):
        execute(model, Run(tokens, reads=["L0.pattern"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())



@pytest.mark.parametrize("write", [
    Write("L0.z", None, rows=slice(5, 8), head=0),  # rows past the batch of 2
    Write("L0.z", None, pos=slice(POS, POS + 3), head=0),  # positions past the end
    Write("L0.resid_pre", None, rows=slice(1, 1)),  # an empty slice
    Write("L0.z", lambda z: z * 0, pos=slice(POS + 1, None), head=1),
    Write("L0.z", None, head=True),  # a bool is not a head index
])
def test_write_selecting_nothing_raises(write):
    """A write whose rows/pos select no element (a slice past the end is empty in Python, not an error)
    or whose head is a bool raises ValueError instead of silently changing nothing."""
    model = build("llama")
    tokens = torch.randint(0, VOCAB, (2, POS))
    with pytest.raises(ValueError, match="selects nothing|head True"):
        execute(model, Run(tokens, writes=[write]))


@pytest.mark.parametrize("rows, pos", [([0, 1], [1, 3]), (torch.tensor([0, 1]), (2, 4)),
                                       (torch.tensor([True, True]), torch.tensor([1, 5]))])
def test_write_with_rows_and_pos_both_lists_raises(rows, pos):
    """rows and pos both index lists would be paired element by element by torch (rows=[0, 1], pos=[1, 3]
    writes (0, 1) and (1, 3), not the grid of four, differing from a plain hook zeroing the grid):
    refused with ValueError; one list with the other a slice or an int writes exactly what a plain hook
    writes at those indices."""
    model = build("attn_only")
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="both lists.*slice or an int"):
        execute(model, Run(tokens, writes=[Write("L1.z", None, rows=rows, pos=pos, head=0)]))

    def zero(mod, args):  # z[rows 0, 1][positions 1, 3] of head 0, as a plain hook on the output projection
        z = args[0].clone().view(2, POS, N_HEADS, D_HEAD)
        z[:, [1, 3], 0] = 0
        return (z.flatten(2),)

    handle = model.get_submodule(PATHS["attn_only"]["o"].format(1)).register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            want = model(tokens).logits
    finally:
        handle.remove()
    got = execute(model, Run(tokens, writes=[Write("L1.z", None, pos=[1, 3], head=0)])).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("rows, pos, match", [
    (None, [True, False, True, False, False, False, False, False], "pos is a list of bools: pass the positions as ints"),
    (None, (True, False), "pos is a list of bools"),
    (None, np.array([True] * POS), "pos is a list of bools"),
    (None, [0, True], "pos is a list of bools"),
    ([True, False], None, r"rows is a list of bools: pass the rows as ints, e.g. rows=torch.nonzero\(mask\)"),
    (None, True, r"pos=True is a bool, not an index: pass pos=int\(i\)"),
    (None, torch.tensor(True), "is a bool, not an index"),
    (np.bool_(True), None, "rows=.*True_? is a bool, not an index"),
])
def test_write_with_bool_rows_or_pos_raises_naming_the_fix(rows, pos, match):
    """A list (or numpy array) of bools as rows / pos crashed inside torch with NotImplementedError, and a
    bool scalar (True) silently wrote every position: refused with ValueError naming the fix, before the run."""
    model = build("attn_only")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, VOCAB, (2, POS))
    with pytest.raises(ValueError, match=match):
        execute(model, Run(tokens, writes=[Write("L1.z", None, rows=rows, pos=pos, head=0)]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("site", ["L1.z", "L1.resid_pre"])
def test_write_with_a_torch_bool_mask_equals_its_int_positions(site):
    """A torch bool tensor as rows / pos is a mask over that axis: it writes exactly what the int
    indices of its True entries write."""
    model = build("attn_only")
    tokens = torch.randint(0, VOCAB, (3, POS), generator=torch.Generator().manual_seed(0))
    head = dict(head=0) if site.endswith(".z") else {}
    mask = torch.zeros(POS, dtype=torch.bool)
    mask[[1, 4]] = True
    for masked, ints in ((dict(pos=mask), dict(pos=[1, 4])),
                         (dict(rows=torch.tensor([True, False, True])), dict(rows=[0, 2]))):
        got = execute(model, Run(tokens, writes=[Write(site, None, **masked, **head)])).logits
        want = execute(model, Run(tokens, writes=[Write(site, None, **ints, **head)])).logits
        plain = execute(model, Run(tokens)).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert not torch.equal(got, plain)


def test_a_bool_position_for_gather_or_logit_diff_raises_naming_it():
    """Gather(True, ids) and logit_diff(..., pos=True) passed the int check (a bool is an int) and failed
    inside the trace (logits[:, True] adds an axis): refused with ValueError before any run."""
    from interventions.engine.tracing import Gather
    from interventions.primitives.patching import logit_diff

    model = build("attn_only")
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Gather pos=True is a bool, not a position"):
        execute(model, Run(tokens, returns=Gather(True, torch.tensor([1, 2]))))
    with pytest.raises(ValueError, match="logit_diff pos=True is a bool, not a position"):
        patch_heads(model, tokens, tokens.roll(1, 0), logit_diff([1, 2], [3, 4], pos=True), progress=False)


def test_gather_and_logit_diff_share_one_position_check():
    """Gather's pos is checked as logit_diff's is (one check): a numpy integer or a 0-d integer tensor is that
    int (Gather called a numpy integer "out of range" and a 0-d tensor not (batch,)), a float is "not one
    position" (Gather said "out of range"), a bool of any kind is refused by both, before any run."""
    from interventions.engine.tracing import Gather
    from interventions.primitives.patching import logit_diff

    model = build("attn_only")
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([1, 2])
    with torch.no_grad():
        want = model(tokens).logits[:, 2, ids]  # independent: the plain forward's logits
    for pos in (2, np.int64(2), np.int32(2 - POS), torch.tensor(2), torch.tensor(2 - POS, dtype=torch.int32)):
        torch.testing.assert_close(execute(model, Run(tokens, returns=Gather(pos, ids))).gathered, want,
                                   atol=1e-6, rtol=0)
    for bad, match in ((2.0, rf"pos=2.0 is not one position: pass an int in \[-{POS}, {POS}\)"),
                       (np.bool_(True), "pos=(np.)?True_? is a bool, not a position"),
                       (torch.tensor(True), r"pos=tensor\(True\) is a bool, not a position"),
                       (POS, f"pos={POS} out of range for {POS} positions")):
        with pytest.raises(ValueError, match="Gather " + match):
            execute(model, Run(tokens, returns=Gather(bad, ids)))
        with pytest.raises(ValueError, match="logit_diff " + match):
            patch_heads(model, tokens, tokens.roll(1, 0), logit_diff([1, 2], [3, 4], pos=bad), progress=False)
    with pytest.raises(ValueError, match=r"Gather pos=2.0 is not one position: .* \(or a \(batch=2,\) tensor"):
        execute(model, Run(tokens, returns=Gather(2.0, ids)))


# ----------------------------------------------------------------------------- reliability

def test_no_reference_kept_to_the_model():
    """After ablations, sweeps, patching, caching and scores, dropping the model frees it (weakref)."""
    from interventions import ZeroAblation, ablation_sweep, head_scores, per_token_loss
    from interventions import PatternPreserving

    model = build("attn_only")
    tokens = torch.randint(0, VOCAB, (2, POS))
    per_token_loss(model, tokens, PatternPreserving(ZeroAblation("L1H0")))
    ablation_sweep(model, tokens, kind="pattern")
    patch_heads(model, tokens, tokens.flip(0), lambda logits, t: logits[:, -1, 0])
    run_with_cache(model, tokens, ["L0.z"])
    head_scores(model, n_examples=2, seq_len=8, prefix_tokens=6)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_model_freed_by_reference_counting():
    """The engine caches each model's nnsight wrapper, holding its modules by weak reference only: with
    the garbage collector off, dropping the last reference frees the model at once (GPU memory too)."""
    from interventions import ZeroAblation, run_with_ablations

    model = build("gpt2")
    tokens = torch.randint(0, VOCAB, (2, POS))
    run_with_ablations(model, tokens, ZeroAblation("L1H0"))
    patch_heads(model, tokens, tokens.flip(0), lambda logits, t: logits[:, -1, 0])
    run_with_cache(model, tokens, ["L0.z", "L1.k"])
    ref = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_replaced_module_is_traced_not_the_cached_one():
    """A run after replacing a submodule the engine already traced (the output projection) writes into
    and reads from the new module: zero-ablating a head equals weight surgery on the new weights, and
    the z read is the new module's input."""
    from interventions import ZeroAblation, run_with_ablations

    model = build("llama")
    tokens = torch.randint(0, VOCAB, (2, POS))
    run_with_ablations(model, tokens, ZeroAblation("L1H0"))
    old = model.model.layers[1].self_attn.o_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(torch.randn(new.weight.shape, generator=torch.Generator().manual_seed(5)))
    model.model.layers[1].self_attn.o_proj = new
    got = run_with_ablations(model, tokens, ZeroAblation("L1H0"))
    z = run_with_cache(model, tokens, ["L1.z"])[1]["L1.z"]  # (batch, pos, head, d_head)
    seen = {}
    h = new.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0].clone()))
    with torch.no_grad():
        new.weight[:, :D_HEAD].zero_()
        want = model(tokens).logits
    h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(z.flatten(2), seen["z"], atol=1e-6, rtol=0)


def test_tokens_edited_in_place_are_checked_again():
    """Token validation is skipped for a tensor already found valid only while it is unchanged: an
    in-place edit that puts an id outside the vocabulary is refused on the next run."""
    model = build("attn_only")
    tokens = torch.randint(0, VOCAB, (2, POS))
    execute(model, Run(tokens))
    tokens[0, 0] = VOCAB
    with pytest.raises(ValueError, match="outside the vocabulary"):
        execute(model, Run(tokens))


def test_memory_bounded_over_many_traces():
    """1,000 traces that write and read leave the process's live Python objects and resident memory
    bounded (tolerance: 2,000 objects, 64 MiB)."""
    import resource

    model = build("attn_only")
    tokens = torch.randint(0, VOCAB, (2, POS))
    run = Run(tokens, reads=["L1.z"], writes=[Write("L0.z", None, head=1)])
    for _ in range(50):
        execute(model, run)
    gc.collect()
    objects, rss = len(gc.get_objects()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(1000):
        execute(model, run)
    gc.collect()
    assert len(gc.get_objects()) - objects < 2000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # KiB


def test_training_mode_with_dropout_runs_in_eval_mode_with_a_warning():
    """A GPT-2 left in training mode (dropout 0.1) gives the eval-mode logits, with a warning, and is
    put back in training mode."""
    from interventions import ZeroAblation, run_with_ablations

    model = build("gpt2")
    tokens = torch.randint(0, VOCAB, (2, POS))
    want = run_with_ablations(model, tokens, ZeroAblation("L0H0"))
    model.train()
    with pytest.warns(UserWarning, match="eval mode"):
        got = run_with_ablations(model, tokens, ZeroAblation("L0H0"))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert model.training and all(m.training for m in model.modules())


def test_an_eval_model_with_attention_dropout_runs_pattern_preserving_without_the_training_warning():
    """``observable``'s added ``hook_pattern`` modules take their attention module's mode. They were
    ``nn.Identity()`` in training mode, so on a GPT-2 put in eval mode (its config's attention dropout
    0.1) every pattern-preserving ablation, sweep and head score warned "training mode with dropout ...
    call model.eval()" although the caller had."""
    import warnings

    from interventions import PatternPreserving, ZeroAblation, per_token_loss

    model = build("gpt2").eval()
    assert model.config.attn_pdrop > 0
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    with observable(model):
        hooks = [m for name, m in model.named_modules() if name.endswith("hook_pattern")]
        assert hooks and not any(m.training for m in hooks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_token_loss(model, tokens, PatternPreserving(ZeroAblation("L1H0")))
    assert not [w for w in caught if "training mode" in str(w.message)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_submodule_left_in_training_mode_runs_in_eval_mode_with_a_warning(arch):
    """``model.eval()`` then one block's ``.train()`` (or the base model's: ``model.model.train()``) leaves
    the model's own flag False but that block's dropout active: GPT-2's ``nn.Dropout`` modules, Llama's
    functional attention dropout (``config.attention_dropout``). Every run used to drop out at random,
    silently (two calls gave different losses); it runs in eval mode with a warning, the modes put back."""
    from interventions import ZeroAblation, per_token_loss

    model = build(arch)
    if arch == "llama":
        model.config.attention_dropout = 0.5
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    want = per_token_loss(model, tokens, ZeroAblation("L0H0"))
    block = get_block(model, 1)
    block.train()
    for _ in range(2):
        with pytest.warns(UserWarning, match="eval mode"):
            got = per_token_loss(model, tokens, ZeroAblation("L0H0"))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not model.training and all(m.training for m in block.modules())


def get_block(model, layer):
    from interventions.engine.adapters import get_adapter

    return get_adapter(model).module(model, layer, "layer")


def test_register_adapter_advice_works():
    """The ArchSpec the unsupported-architecture error suggests (no pattern path) supports zero and
    pattern-preserving ablation on a Llama model registered under a new name."""
    from interventions import ArchSpec, PatternPreserving, ZeroAblation, register_adapter, run_with_ablations
    from interventions.engine.adapters import ARCHS

    model = build("llama")
    tokens = torch.randint(0, VOCAB, (2, POS))
    want = run_with_ablations(model, tokens, PatternPreserving(ZeroAblation("L0H1")))
    model.config.model_type = "my_llama"
    register_adapter("my_llama", ArchSpec(layers="model.layers", attn="self_attn", o_proj="o_proj", k_proj="k_proj"))
    try:
        got = run_with_ablations(model, tokens, PatternPreserving(ZeroAblation("L0H1")))
        run_with_ablations(model, tokens, ZeroAblation("L0H1"))
    finally:
        ARCHS.pop("my_llama")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_adapter_registered_after_renaming_the_model_type_is_used():
    """A model run once, then renamed (``config.model_type``) and registered with a wrong module path, is
    refused naming the path: the cached adapter of its old type is not silently used (it read the
    built-in module instead)."""
    from interventions import ArchSpec, register_adapter
    from interventions.engine.adapters import ARCHS, get_adapter

    model = build("llama")
    tokens = torch.randint(0, VOCAB, (2, POS))
    execute(model, Run(tokens, reads=["L0.z"]))
    model.config.model_type = "my_llama"
    register_adapter("my_llama", ArchSpec(layers="model.layers", attn="self_attn", o_proj="out_proj",
                                          k_proj="k_proj"))
    try:
        assert get_adapter(model).spec is ARCHS["my_llama"]
        with pytest.raises(InterventionError, match="no module at 'model.layers.0.self_attn.out_proj'"):
            execute(model, Run(tokens, reads=["L0.z"]))
    finally:
        ARCHS.pop("my_llama")


@pytest.mark.parametrize("paths, site", [
    (dict(o_proj="o_proj.weight"), "L0.z"),  # a parameter, not a module (was a KeyError from the trace)
    (dict(layers="model"), "L0.resid_pre"),  # a module that is not a list (was a TypeError)
])
def test_registered_path_to_no_module_raises_naming_the_fix(paths, site):
    """An adapter path that ends at a parameter, or indexes a module that is not a list, is refused
    naming the path and register_adapter, for reads and writes alike."""
    from interventions import ArchSpec, register_adapter
    from interventions.engine.adapters import ARCHS

    model = build("llama")
    model.config.model_type = "my_llama"
    tokens = torch.randint(0, VOCAB, (2, POS))
    spec = dict(layers="model.layers", attn="self_attn", o_proj="o_proj", k_proj="k_proj")
    register_adapter("my_llama", ArchSpec(**{**spec, **paths}))
    try:
        for run in (Run(tokens, reads=[site]), Run(tokens, writes=[Write(site, None)])):
            with pytest.raises(InterventionError, match="no module at .*register_adapter"):
                execute(model, run)
    finally:
        ARCHS.pop("my_llama")


def _plain_hook(model, module, tokens, grab):
    """What ``grab(args, out)`` takes from ``module`` in a plain forward of ``model`` (a torch hook, the oracle)."""
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(grab(args, out).clone()))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    return seen[0]


def test_mlp_elsewhere_advice_works():
    """A registered adapter whose MLP path is wrong is told to register the MLP's path (not that the
    model is attention-only), and the advice, followed, reads exactly the MLP's output (plain hook)."""
    import interventions
    from interventions.engine.adapters import ARCHS

    model = build("llama")
    model.config.model_type = "my_llama"
    tokens = torch.randint(0, VOCAB, (2, POS))
    spec = dict(layers="model.layers", attn="self_attn", o_proj="o_proj", k_proj="k_proj")
    interventions.register_adapter("my_llama", interventions.ArchSpec(**spec, mlp="feed_forward"))
    try:
        with pytest.raises(ValueError, match=r"no MLP at 'model.layers.0.feed_forward'.*ArchSpec\(mlp="):
            execute(model, Run(tokens, reads=["L0.mlp_out"]))
        interventions.register_adapter("my_llama", interventions.ArchSpec(**spec, mlp="mlp"))
        got = execute(model, Run(tokens, reads=["L0.mlp_out"])).acts["L0.mlp_out"]
    finally:
        ARCHS.pop("my_llama")
    torch.testing.assert_close(got, _plain_hook(model, model.model.layers[0].mlp, tokens, lambda args, out: out),
                               atol=0, rtol=0)


def test_registered_unembed_path_that_does_not_exist_raises_naming_the_fix():
    """An adapter registered with ``unembed`` naming no module is refused naming ArchSpec(unembed=...),
    for a run and for the copying score, before any forward (it fell back to the model's output embeddings
    silently); named right, the final site reads the lm_head's input (plain hook); left unset, the model's
    get_output_embeddings() is used."""
    from interventions import ArchSpec, register_adapter
    from interventions.analysis.scores import copying_score
    from interventions.engine.adapters import ARCHS, get_adapter

    model = build("llama")
    model.config.model_type = "my_llama"
    tokens = torch.randint(0, VOCAB, (2, POS))
    spec = dict(layers="model.layers", attn="self_attn", o_proj="o_proj", k_proj="k_proj", final_norm="model.norm")
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        register_adapter("my_llama", ArchSpec(**spec, unembed="lm_heads"))
        with pytest.raises(ValueError, match=r"no unembedding module at 'lm_heads'.*ArchSpec\(unembed="):
            run_with_cache(model, tokens, ["final"])
        with pytest.raises(ValueError, match=r"no unembedding module at 'lm_heads'.*ArchSpec\(unembed="):
            execute(model, Run(tokens, reads=["L0.z"]))
        with pytest.raises(ValueError, match=r"no unembedding module at 'lm_heads'.*ArchSpec\(unembed="):
            copying_score(model, bos_id=0, token_pool=torch.arange(1, VOCAB))
        assert calls == []
        register_adapter("my_llama", ArchSpec(**spec, unembed="lm_head"))
        got = run_with_cache(model, tokens, ["final"])[1]["final"]
        register_adapter("my_llama", ArchSpec(**spec))
        assert get_adapter(model).point("final", model) == ("lm_head", "input")
        with pytest.raises(ValueError, match=r"pass it, get_adapter\(model\).point\('final', model\)"):
            get_adapter(model).point("final")
    finally:
        handle.remove()
        ARCHS.pop("my_llama", None)
    torch.testing.assert_close(got, _plain_hook(model, model.lm_head, tokens, lambda args, out: args[0]),
                               atol=0, rtol=0)


@pytest.mark.parametrize("site, match", [
    ((True, "z"), "not an integer"),  # was Site(True, 'z'): refused later as a module missing from the adapter
    ((1.0, "z"), "not an integer"),
    ((-1, "z"), "out of range: (layers are numbered from 0|this model has layers 0-1)"),  # ended at "range: "
])
def test_site_with_a_bad_layer_raises_naming_the_fix(site, match):
    model = build("llama")
    with pytest.raises(ValueError, match=match):
        parse_site(site)
    with pytest.raises(ValueError, match=match):
        execute(model, Run(torch.randint(0, VOCAB, (2, POS)), reads=[site]))


def test_register_adapter_hint_runs_as_written():
    """The unsupported-architecture error's suggested call, executed as written with only ``import
    interventions`` (it named ``ArchSpec`` unqualified and a placeholder ``model_type``: a NameError),
    registers the model, whose z writes then equal zeroing the head's o_proj columns (weight surgery)."""
    import re

    import interventions
    from interventions.engine.adapters import ARCHS

    model = build("llama")
    model.config.model_type = "my_llama"
    tokens = torch.randint(0, VOCAB, (2, POS))
    with pytest.raises(ValueError, match="unsupported architecture") as err:
        execute(model, Run(tokens))
    code = re.search(r"(interventions\.register_adapter\(.*\))  #", str(err.value)).group(1)
    try:
        exec(code, {"interventions": interventions})
        got = execute(model, Run(tokens, writes=[Write("L1.z", None, head=2)])).logits
    finally:
        ARCHS.pop("my_llama", None)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * D_HEAD:3 * D_HEAD] = 0
        want = model(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type, fields, match", [
    (5, {}, "model_type must be"),
    ("my_arch", dict(fused_qkv="GPT2"), "fused_qkv='GPT2'"),  # was a shape error from inside the trace
    ("my_arch", dict(block_output="tuples"), "block_output='tuples'"),
])
def test_register_adapter_refuses_bad_input(model_type, fields, match):
    from interventions import ArchSpec, register_adapter
    from interventions.engine.adapters import ARCHS

    before = dict(ARCHS)
    with pytest.raises(ValueError, match=match):
        register_adapter(model_type, ArchSpec("model.layers", "self_attn", "o_proj", "k_proj", **fields))
    assert ARCHS == before


@pytest.mark.parametrize("head", [np.int64(1), torch.tensor(1), 1.0])
def test_write_head_that_is_not_an_int_raises_naming_the_fix(head):
    """A numpy / torch / float head index is refused as such (it was reported as out of range although
    it is in range), before anything runs."""
    model = build("llama")
    with pytest.raises(ValueError, match=r"is not an int: pass head=int\(h\)"):
        execute(model, Run(torch.randint(0, VOCAB, (2, POS)), writes=[Write("L1.z", None, head=head)]))


def test_head_is_exported_and_addresses_a_head():
    """The README's ``Head(layer, head)`` is importable from the package (it was only in
    interventions.engine.heads), and ablating ``iv.Head(1, 2)`` equals ablating ``"L1H2"``."""
    import interventions as iv

    assert "Head" in iv.__all__ and all(hasattr(iv, name) for name in iv.__all__)
    model = build("llama")
    tokens = torch.randint(0, VOCAB, (2, POS))
    got = iv.run_with_ablations(model, tokens, iv.ZeroAblation(iv.Head(1, 2)))
    torch.testing.assert_close(got, iv.run_with_ablations(model, tokens, iv.ZeroAblation("L1H2")), atol=0, rtol=0)


@pytest.mark.parametrize("run, match", [
    (dict(reads="L0.z"), r"one site: pass a list of sites, reads=\['L0.z'\]"),  # was "malformed site 'L'"
    (dict(reads=Site(0, "z")), "one site: pass a list of sites"),  # was "malformed site 0"
    (dict(writes=Write("L0.z", None)), r"one write: pass a list of writes"),  # was a TypeError
])
def test_run_given_one_site_or_write_raises_naming_the_fix(run, match):
    model = build("llama")
    tokens = torch.randint(0, VOCAB, (2, POS))
    with pytest.raises(ValueError, match=match):
        execute(model, Run(tokens, **run))
    out = execute(model, Run(tokens, reads=("L0.z", "final")))  # a tuple of two sites is still two sites
    assert set(out.acts) == {"L0.z", "final"}


def test_observable_missing_an_attention_module_leaves_the_model_as_it_was():
    """A model whose layer 1 has no attention module at the adapter's path (a hybrid stack, a wrong
    adapter) is refused naming register_adapter, and layer 0 keeps no hook_pattern (it was left added,
    the model edited for good)."""
    model = build("llama")
    del model.model.layers[1].self_attn
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="no attention module at 'model.layers.1.self_attn'.*register_adapter"):
        with observable(model):
            pass
    assert not hasattr(model.model.layers[0].self_attn, "hook_pattern")
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("name, here", [
    ("blocks.0.attn.hook_z", "L0.z"), ("blocks.3.hook_resid_pre", "L3.resid_pre"), ("blocks.1.attn.hook_pattern",
    "L1.pattern"), ("blocks.0.hook_attn_out", "L0.attn_out"), ("L2.hook_k", "L2.k"), ("ln_final.hook_normalized", "final"),
])
def test_a_transformer_lens_hook_name_is_refused_naming_the_site(name, here):
    """A TransformerLens hook name is not a site (one vocabulary), but the error names the site it means
    (it used to list the valid forms only, leaving the translation to the README's table)."""
    with pytest.raises(ValueError, match=f"is '{here}' here"):
        parse_site(name)


def test_site_names_round_trip():
    """Every kind parses from its name and prints back to it."""
    for kind in LAYER_KINDS:
        assert str(parse_site(f"L3.{kind}")) == f"L3.{kind}" and parse_site(Site(3, kind)) == Site(3, kind)
    assert str(parse_site("final")) == "final"


def test_dropout_seen_again_on_each_call():
    """Training mode is read on every call: eval, then train() (warns, eval-mode logits), eval() again
    (silent), then train() again (warns again); the modes are put back each time."""
    import warnings

    from interventions import ZeroAblation, run_with_ablations

    model = build("gpt2").eval()
    tokens = torch.randint(0, VOCAB, (2, POS))
    want = run_with_ablations(model, tokens, ZeroAblation("L0H0"))
    for _ in range(2):
        model.train()
        with pytest.warns(UserWarning, match="eval mode"):
            got = run_with_ablations(model, tokens, ZeroAblation("L0H0"))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert all(m.training for m in model.modules())
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(run_with_ablations(model, tokens, ZeroAblation("L0H0")), want, atol=0, rtol=0)


def test_unwrap_finds_a_wrapped_module():
    """``unwrap`` returns a torch module as it is, and the module under a ``_module`` attribute or submodule."""
    from torch import nn

    from interventions.engine.tracing import unwrap

    model = build("gpt2")

    class Holder:
        def __init__(self, m):
            self._module = m

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self._module = m

    assert unwrap(model) is model and unwrap(Holder(model)) is model and unwrap(Wrapper(model)) is model


@pytest.mark.parametrize("arch", ["attn_only", "gpt2", "llama"])
def test_write_at_the_start_layer_leaves_the_prefix_alone(arch):
    """A run that starts above layer 0 and writes the residual entering its start layer (resid_pre)
    neither edits the caller's ``prefix`` in place nor lets one run's patch leak into the next run
    with the same prefix: each of several single-position patches equals the plain-hook patch."""
    model = build(arch)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (2, POS), generator=g)
    prefix = run_with_cache(model, tokens, ["L1.resid_pre"])[1]["L1.resid_pre"]
    before = prefix.clone()
    block = _module(model, PATHS[arch]["block"].format(1))
    for p in (2, 4):
        value = torch.randn(2, 32, generator=g)
        got = execute(model, Run(tokens, start=1, prefix=prefix, writes=[Write("L1.resid_pre", value, pos=p)])).logits

        def hook(mod, args, kwargs, p=p, value=value):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[:, p] = value
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        h = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                want = model(tokens).logits
        finally:
            h.remove()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(prefix, before)


def test_gather_with_one_position_per_row_matches_the_logits():
    """Gather with a (batch,) tensor of positions returns logits[row, pos[row], ids[row]] of a plain
    forward (negative positions counted from the end); a tensor of the wrong shape, dtype or range
    raises ValueError naming it, before the run."""
    from interventions.engine.tracing import Gather

    model = build("gpt2")
    tokens = torch.randint(0, VOCAB, (3, POS), generator=torch.Generator().manual_seed(5))
    where, ids = torch.tensor([6, 2, -1]), torch.tensor([[1, 2], [3, 4], [5, 6]])
    got = execute(model, Run(tokens, returns=Gather(where, ids))).gathered
    with torch.no_grad():
        logits = model(tokens).logits
    want = torch.stack([logits[i, where[i], ids[i]] for i in range(3)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for bad, match in ((torch.tensor([1, 2]), r"\(batch=3,\) tensor .* shape \(2,\)"),
                       (torch.tensor([1.0, 2.0, 3.0]), "dtype torch.float32"),
                       (torch.tensor([0, POS, 0]), f"holds {POS}, out of range for {POS} positions"),
                       (torch.tensor([0, -POS - 1, 0]), f"holds {-POS - 1}, out of range")):
        with pytest.raises(ValueError, match=match):
            execute(model, Run(tokens, returns=Gather(bad, ids)))


def test_readme_escape_hatch_raw_nnsight_at_a_site_string():
    """README: ``iv.wrap(model)`` is a bare nnsight wrapper, ``get_adapter(model).point(site)`` its module
    path; a site given as a string (``"L0.z"``, as everywhere else) works (it raised AttributeError)."""
    from interventions import wrap
    from interventions.engine.adapters import get_adapter, module_at

    model = build("gpt2")
    tokens = torch.randint(0, VOCAB, (2, POS))
    path, io = get_adapter(model).point("L0.z")
    assert (path, io) == get_adapter(model).point(Site(0, "z")) == (PATHS["gpt2"]["o"].format(0), "input")
    lm = wrap(model)
    with lm.trace(tokens):
        z = getattr(module_at(lm, path), io).save()
    z = z[0][0] if isinstance(z, tuple) else z  # an input is (args, kwargs)
    want = run_with_cache(model, tokens, ["L0.z"])[1]["L0.z"]
    torch.testing.assert_close(z.reshape(want.shape), want)


def test_wrap_of_a_wrapped_model_uses_the_tokenizer():
    """``wrap(wrap(model), tokenizer)`` takes string prompts (the tokenizer was ignored: a bare NNsight came
    back), with the model's own logits on the tokenized prompt; a TransformersModel (not an NNsight subclass)
    comes back as it is without a tokenizer or with its own (it was wrapped again: an AttributeError at the
    trace, a hub lookup), and is refused naming the fix with another tokenizer."""
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM, wrap
    from interventions.zoo.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=len(tok))).eval()
    lm = wrap(wrap(model), tok)
    with lm.trace("hello"):
        got = lm.output.logits.save()
    with torch.no_grad():
        want = model(torch.tensor([tok("hello")["input_ids"]])).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert wrap(lm, tok) is lm and wrap(lm) is lm
    with pytest.raises(ValueError, match=r"keeps its own tokenizer.*wrap\(hf_model, tokenizer\)"):
        wrap(lm, byte_tokenizer())


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_fused_qkv_under_grouped_query_attention(n_kv):
    """A model registered with q|k|v fused along the last dimension (``fused_qkv="gpt2"``, Phi-3's
    qkv_proj) under grouped-query attention: q, k and v read from the fused output's q (n_heads heads),
    k and v (n_kv_heads heads each) blocks, as a plain hook splits them; a write to kv head 0 of v
    changes exactly its slice of the projection output."""
    import transformers as T

    from interventions import ArchSpec, register_adapter
    from interventions.engine.adapters import ARCHS

    torch.manual_seed(0)
    model = T.Phi3ForCausalLM(T.Phi3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=n_kv, intermediate_size=64, max_position_embeddings=64,
                                           pad_token_id=0)).eval()
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.get_submodule("model.layers.1.self_attn.qkv_proj").register_forward_hook(
        lambda mod, args, out: seen.append(out.clone()))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    raw = seen[0]
    want = dict(zip("qkv", raw.split([N_HEADS * D_HEAD, n_kv * D_HEAD, n_kv * D_HEAD], dim=-1)))
    register_adapter("phi3", ArchSpec(layers="model.layers", attn="self_attn", o_proj="o_proj", k_proj="qkv_proj",
                                      fused_qkv="gpt2"))
    try:
        got = run_with_cache(model, tokens, ["L1.q", "L1.k", "L1.v"])[1]
        written = []
        handle = model.get_submodule("model.layers.1.self_attn.qkv_proj").register_forward_hook(
            lambda mod, args, out: written.append(out.clone()))
        try:
            execute(model, Run(tokens, writes=[Write("L1.v", None, head=0)]))
        finally:
            handle.remove()
    finally:
        ARCHS.pop("phi3")
    for kind in "qkv":
        n = N_HEADS if kind == "q" else n_kv
        torch.testing.assert_close(got[f"L1.{kind}"], want[kind].reshape(2, POS, n, D_HEAD), atol=0, rtol=0)
    lo = (N_HEADS + n_kv) * D_HEAD
    expect = raw.clone()
    expect[..., lo:lo + D_HEAD] = 0
    torch.testing.assert_close(written[-1], expect, atol=0, rtol=0)  # (earlier: the take-effect probe)


def _qk_norm_model(arch):
    """A one-layer OLMo2 (q_norm / k_norm over all heads together, before the heads are split) or Qwen3 (one
    q_norm / k_norm per head) with random norm weights, grouped-query attention (4 heads, 2 kv heads)."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64, head_dim=8)
    model = (T.Olmo2ForCausalLM(T.Olmo2Config(**common)) if arch == "olmo2"
             else T.Qwen3ForCausalLM(T.Qwen3Config(**common))).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["q", "k"])
def test_a_per_head_write_that_reaches_other_heads_is_refused_naming_the_fix(kind):
    """OLMo2 normalizes q (and k) over all heads at once, *after* q_proj: registered as the
    unsupported-architecture error suggests (q/k sites at the projections), a write to one head's q or k
    rescales every head's, so patch_heads(site="q") would silently measure a patch of every head. Such a
    write is refused, naming the fix (sites after the norm); a write to all heads (head=None) is not
    per-head and runs. Registered with ArchSpec(q_proj="q_norm", k_proj="k_norm") the sites are read
    after the norm (what a plain hook there sees) and a patch of one (kv) head reaches only its query
    heads, equal to replacing that slice in a plain hook. Qwen3 (one norm per head) stays per-head at
    the projections, so its writes there are not refused."""
    from interventions import ArchSpec, register_adapter
    from interventions.engine.adapters import ARCHS

    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randint(0, VOCAB, (2, POS), generator=g), torch.randint(0, VOCAB, (2, POS), generator=g)

    def metric(logits, tokens):
        return logits[:, -1].log_softmax(-1)[torch.arange(len(tokens)), clean[:, -1]]

    hint = dict(layers="model.layers", attn="self_attn", o_proj="o_proj", attn_is_o_proj=True, final_norm="model.norm")
    olmo = _qk_norm_model("olmo2")
    register_adapter("olmo2", ArchSpec(k_proj="k_proj", **hint))
    try:
        with pytest.raises(InterventionError, match=rf"one (kv )?head of L0\.{kind}.*{kind}_proj='{kind}_norm'"):
            patch_heads(olmo, clean, corrupted, metric, site=kind)
        with pytest.raises(InterventionError, match=rf"{kind}_norm"):
            execute(olmo, Run(clean, writes=[Write(f"L0.{kind}", None, head=1)]))
        execute(olmo, Run(clean, writes=[Write(f"L0.{kind}", lambda x: 2 * x)]))  # every head at once: no error

        register_adapter("olmo2", ArchSpec(q_proj="q_norm", k_proj="k_norm", **hint))
        norm = olmo.get_submodule(f"model.layers.0.self_attn.{kind}_norm")
        n = 4 if kind == "q" else 2
        seen = []
        handle = norm.register_forward_hook(lambda mod, args, out: seen.append(out.clone()))
        try:
            with torch.no_grad():
                olmo(clean)
        finally:
            handle.remove()
        src = seen[0].reshape(2, POS, n, D_HEAD)
        torch.testing.assert_close(run_with_cache(olmo, clean, [f"L0.{kind}"])[1][f"L0.{kind}"], src, atol=0, rtol=0)
        got = patch_heads(olmo, clean, corrupted, metric, site=kind)
        for head in range(n):
            def edit(mod, args, out, head=head):
                out = out.clone()
                out.view(2, POS, n, D_HEAD)[:, :, head] = src[:, :, head]
                return out

            handle = norm.register_forward_hook(edit)
            try:
                with torch.no_grad():
                    want = metric(olmo(corrupted).logits, corrupted).mean()
            finally:
                handle.remove()
            torch.testing.assert_close(got[0, head], want, atol=1e-5, rtol=0)
        z = execute(olmo, Run(corrupted, reads=["L0.z"])).acts["L0.z"]
        moved = execute(olmo, Run(corrupted, reads=["L0.z"], writes=[Write(f"L0.{kind}", src[:, :, 1], head=1)])).acts["L0.z"]
        changed = ((moved - z).abs().amax(dim=(0, 1, 3)) > 0).tolist()
        assert changed == ([False, True, False, False] if kind == "q" else [False, False, True, True])
    finally:
        ARCHS.pop("olmo2", None)

    renamed = _qk_norm_model("olmo2")  # an OLMo2 passed off as a Llama (same module paths): refused too
    renamed.config.model_type = "llama"
    with pytest.raises(InterventionError, match=rf"this llama model mixes heads.*{kind}_proj='{kind}_norm'"):
        execute(renamed, Run(clean, writes=[Write(f"L0.{kind}", None, head=1)]))

    qwen = _qk_norm_model("qwen3")
    register_adapter("qwen3", ArchSpec(k_proj="k_proj", **hint))
    try:  # per-head norms: each head's write stays its own
        execute(qwen, Run(clean, writes=[Write(f"L0.{kind}", None, head=1)]))
    finally:
        ARCHS.pop("qwen3", None)


def test_a_fused_projection_registered_with_the_wrong_layout_refuses_per_head_writes():
    """CodeGen fuses q, v and k in blocks of [q | v | k] (one block per model-parallel shard), not GPT-2's
    [q | k | v]: registered with fused_qkv="gpt2", the q view's last head is a slice of another head's
    values, so a patch of it would silently change that head (head 0's q slice happens to be right, so
    every head is probed, not only head 0). Refused, naming the layout; a model whose fused projection
    is [q | k | v] (GPT-BigCode, multi-query: one key/value head) takes per-head writes."""
    import transformers as T

    from interventions import ArchSpec, register_adapter
    from interventions.engine.adapters import ARCHS

    torch.manual_seed(0)
    codegen = T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                                   n_positions=64, bos_token_id=1, eos_token_id=2)).eval()
    bigcode = T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                                         n_positions=64, multi_query=True)).eval()
    tokens = torch.randint(0, VOCAB, (2, POS), generator=torch.Generator().manual_seed(0))
    register_adapter("codegen", ArchSpec(layers="transformer.h", attn="attn", o_proj="out_proj", k_proj="qkv_proj",
                                         fused_qkv="gpt2"))
    register_adapter("gpt_bigcode", ArchSpec(layers="transformer.h", attn="attn", o_proj="c_proj", k_proj="c_attn",
                                             fused_qkv="gpt2"))
    try:
        for kind in "qkv":
            with pytest.raises(InterventionError, match=rf"one (kv )?head of L0\.{kind} reaches other heads.*"
                                                        r"fused_qkv='gpt2'\) reads \[q \| k \| v\]"):
                execute(codegen, Run(tokens, writes=[Write(f"L0.{kind}", None, head=0)]))
        z = execute(bigcode, Run(tokens, reads=["L0.z"])).acts["L0.z"]
        moved = execute(bigcode, Run(tokens, reads=["L0.z"], writes=[Write("L0.q", None, head=3)])).acts["L0.z"]
        assert ((moved - z).abs().amax(dim=(0, 1, 3)) > 0).tolist() == [False, False, False, True]
        execute(bigcode, Run(tokens, writes=[Write("L0.k", None, head=0)]))  # its one kv head: all query heads
    finally:
        ARCHS.pop("codegen", None)
        ARCHS.pop("gpt_bigcode", None)
