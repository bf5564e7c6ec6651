"""Tests of the batched ablation sweep against one-head-at-a-time ``per_token_loss``."""

import pytest
import torch

from interventions import MeanAblation, PatternPreserving, ZeroAblation, per_token_loss
from interventions.engine.heads import all_heads
from interventions.primitives.sweep import ablation_sweep, sweep_table


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=50, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _oracle(model, tokens, kind, heads, reference):
    """Unbatched: one per_token_loss call per head, minus the clean loss."""
    clean = per_token_loss(model, tokens)
    out = []
    for h in heads:
        abl = {"zero": lambda: ZeroAblation(h), "mean": lambda: MeanAblation(h, reference),
               "pattern": lambda: PatternPreserving(ZeroAblation(h))}[kind]()
        out.append(per_token_loss(model, tokens, abl) - clean)
    return clean, torch.stack(out)


@pytest.mark.parametrize("which", ["attn_only", "gpt2"])
@pytest.mark.parametrize("kind", ["zero", "mean", "pattern"])
def test_sweep_equals_unbatched(which, kind, tiny_model, tiny_gpt2):
    """Batched sweep (3 heads per pass, so the last pass is partial; 2-row chunks of a 3-row batch)
    equals, to 1e-5, ablating each head alone with per_token_loss; clean loss equals the plain loss."""
    model = tiny_model if which == "attn_only" else tiny_gpt2
    torch.manual_seed(2)
    tokens = torch.randint(0, 50, (3, 10))
    reference = torch.randint(0, 50, (5, 12)) if kind == "mean" else None
    heads = all_heads(2, 4)
    clean, delta = ablation_sweep(model, tokens, kind=kind, heads_per_pass=3, reference=reference, batch_size=2)
    ref_clean, ref_delta = _oracle(model, tokens, kind, heads, reference)
    assert delta.shape == (8, 3, 9) and clean.shape == (3, 9)
    torch.testing.assert_close(clean, ref_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta, ref_delta, atol=1e-5, rtol=0)
    assert delta.abs().max() > 1e-4  # the ablations did something


def test_sweep_subset_order_and_default_reference(tiny_model):
    """A chosen subset comes back in the order given; kind='mean' without a reference uses the tokens."""
    torch.manual_seed(3)
    tokens = torch.randint(0, 50, (4, 8))
    heads = ["L1H2", "L0H1"]
    _, delta = ablation_sweep(tiny_model, tokens, kind="mean", heads=heads, heads_per_pass=8)
    _, ref = _oracle(tiny_model, tokens, "mean", heads, tokens)
    torch.testing.assert_close(delta, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_sweep_default_reference_refused_on_padded_tokens(tiny_model, kind):
    """kind='mean'/'resample' without a reference uses the tokens as the (unpadded) reference: on a padded
    batch that would average pad tokens run as real ones (the result changed with the pad ids), so it
    raises naming the fix; an explicit unpadded reference works."""
    tokens = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="pass reference="):
        ablation_sweep(tiny_model, tokens, kind=kind, attention_mask=mask)
    ablation_sweep(tiny_model, tokens, kind=kind, attention_mask=torch.ones_like(mask))  # no padding: fine
    ablation_sweep(tiny_model, tokens, kind=kind, attention_mask=mask, reference=tokens[[0, 2]])


def test_padded_tokens_given_as_the_reference_are_refused_before_any_run(tiny_model):
    """The same mistake with the reference given explicitly (the module docstring's factory
    ``lambda heads: MeanAblation(heads, tokens)``, ``per_token_loss(..., MeanAblation(h, tokens))``) ran: the
    pad ids were run as tokens and entered the means (the sweep's delta moved by 0.04 nats when the pad ids
    changed). Refused in every primitive, the padded rows found also in a chunk (row_offset) and under
    PatternPreserving, before any forward; a reference of other rows, or no padding, works."""
    from interventions import ResampleAblation, run_with_ablations
    from interventions.primitives.loss import per_token_loss_sets

    tokens = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0
    calls = []
    hook = tiny_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for call in (
                lambda: ablation_sweep(tiny_model, tokens, kind=lambda hs: MeanAblation(hs, tokens), attention_mask=mask),
                lambda: ablation_sweep(tiny_model, tokens, kind=lambda hs: PatternPreserving(ResampleAblation(hs, tokens)),
                                       attention_mask=mask),
                lambda: per_token_loss(tiny_model, tokens, MeanAblation("L1H0", tokens.clone()), attention_mask=mask),
                lambda: per_token_loss(tiny_model, tokens, [ZeroAblation("L0H0"), ResampleAblation("L1H0", tokens)],
                                       attention_mask=mask, batch_size=1),
                lambda: run_with_ablations(tiny_model, tokens[1:], MeanAblation("L1H0", tokens), attention_mask=mask[1:],
                                           row_offset=1),
                lambda: per_token_loss_sets(tiny_model, tokens, {"mean": MeanAblation("L1H0", tokens)},
                                            attention_mask=mask)):
            with pytest.raises(ValueError, match="holds row 1 of the tokens, which is padded"):
                call()
    finally:
        hook.remove()
    assert not calls
    per_token_loss(tiny_model, tokens, MeanAblation("L1H0", tokens), attention_mask=torch.ones_like(mask))
    per_token_loss(tiny_model, tokens, MeanAblation("L1H0", tokens[[0, 2]]), attention_mask=mask)
    run_with_ablations(tiny_model, tokens[2:], MeanAblation("L1H0", tokens), attention_mask=mask[2:], row_offset=2)


def test_sweep_heads_per_pass_invariant(tiny_model):
    """The result does not depend on how many heads share a forward pass."""
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    _, a = ablation_sweep(tiny_model, tokens, heads_per_pass=1)
    _, b = ablation_sweep(tiny_model, tokens, heads_per_pass=8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sweep_table(tiny_model):
    """One row per layer x head x token_index; mean and sem over sequences match a direct computation."""
    tokens = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(5))
    _, delta = ablation_sweep(tiny_model, tokens, progress=True)
    df = sweep_table(delta, all_heads(2, 4))
    assert len(df) == 8 * 5
    row = df[(df.layer == 1) & (df["head"] == 2) & (df.token_index == 3)].iloc[0]
    d = delta[6, :, 2]
    assert row["name"] == "L1H2" and row["n"] == 3
    assert abs(row["delta_loss"] - d.mean().item()) < 1e-6
    assert abs(row["sem"] - (d.std() / 3 ** 0.5).item()) < 1e-6
    with pytest.raises(ValueError, match="in the order of the sweep"):
        sweep_table(delta, ["L0H0"])


def test_sweep_bad_inputs(tiny_model):
    """Unknown kinds, out-of-range or duplicate heads, a stray reference and a bad batch_size raise
    ValueError naming the fix."""
    tokens = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="'zero', 'mean', 'resample', 'pattern'"):
        ablation_sweep(tiny_model, tokens, kind="bogus")
    with pytest.raises(ValueError, match="heads 0-3"):
        ablation_sweep(tiny_model, tokens, heads=["L0H9"])
    with pytest.raises(ValueError, match="more than once"):
        ablation_sweep(tiny_model, tokens, heads=["L0H1", "L0H1"])
    with pytest.raises(ValueError, match="only used by kind='mean'"):
        ablation_sweep(tiny_model, tokens, kind="zero", reference=tokens)
    with pytest.raises(ValueError, match="heads_per_pass"):
        ablation_sweep(tiny_model, tokens, heads_per_pass=0)
    with pytest.raises(ValueError, match="batch_size"):
        ablation_sweep(tiny_model, tokens, batch_size=0)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("value", [
    lambda z: z.mean(0),  # (pos, d_head): broadcastable, but not the activation's shape
    lambda z: z[..., :3],  # wrong width
    torch.zeros(1, 6, 3),  # a tensor of the wrong width
    lambda z: (10 * z).long(),  # integers (the trace refuses them; the shortcut used to cast them to float)
])
def test_sweep_rejects_wrong_shaped_values_like_per_token_loss(tiny_model, monkeypatch, shortcut, value):
    """A custom ablation whose value (a function's result or a tensor) has the wrong shape raises the same
    ValueError in a sweep as in per_token_loss, with or without the attention shortcut (it used to be
    broadcast silently, or fail with a bare torch error, where the shortcut edits z itself), or is not
    floating-point."""
    from interventions.primitives import sweep
    from interventions.primitives.ablation import Ablation

    class Custom(Ablation):
        def value(self, head, tokens, row_offset=0, positions=None):
            return value

    monkeypatch.setattr(sweep, "_ATTN_SHORTCUT", shortcut)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="activation's shape|does not fit|floating-point"):
        per_token_loss(tiny_model, tokens, Custom("L1H0"))
    with pytest.raises(ValueError, match="activation's shape|does not fit|floating-point"):
        ablation_sweep(tiny_model, tokens, kind=Custom(["L1H0"]))


@pytest.mark.parametrize("which", ["attn_only", "gpt2"])
@pytest.mark.parametrize("kind", ["zero", "mean", "pattern"])
def test_sweep_in_one_pass_equals_unbatched(which, kind, tiny_model, tiny_gpt2, monkeypatch):
    """The one-pass sweep (a launch-bound GPU's path, enabled here on the CPU: clean rows and one block of
    rows per head in a single forward) equals per-head ablation to 1e-5, on a padded batch too; it is
    taken (one engine run per chunk) except for pattern-preserving ablation, which needs the clean
    patterns first."""
    import interventions.primitives.sweep as S
    from interventions.engine.tracing import Engine

    monkeypatch.setattr(S, "ONE_PASS_DEVICES", ("cpu",))
    runs = []
    real_run = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, run, verify=True: runs.append(run) or real_run(self, run, verify))
    model = tiny_model if which == "attn_only" else tiny_gpt2
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 50, (3, 10), generator=g)
    reference = torch.randint(0, 50, (5, 12), generator=g) if kind == "mean" else None
    clean, delta = ablation_sweep(model, tokens, kind=kind, reference=reference, batch_size=2)
    big = [r for r in runs if r.tokens.shape == (r.tokens.shape[0], 10) and r.tokens.shape[0] > 2]  # the passes
    ref_clean, ref_delta = _oracle(model, tokens, kind, all_heads(2, 4), reference)
    torch.testing.assert_close(clean, ref_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta, ref_delta, atol=1e-5, rtol=0)
    if kind == "pattern":
        assert all(r.tokens.shape[0] <= 8 * 2 for r in big)  # grouped passes, not one of 9 blocks
    else:
        assert [r.tokens.shape[0] for r in big] == [9 * 2, 9 * 1]  # one pass per chunk (2 + 1 rows)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding: real tokens at their unpadded positions
    if kind != "mean":
        c_pad, d_pad = ablation_sweep(model, tokens, kind=kind, attention_mask=mask)
        c_ref, d_ref = ablation_sweep(model, tokens[:1, 3:], kind=kind)
        torch.testing.assert_close(d_pad[:, :1, 3:], d_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["attn_only", "gpt2"])
@pytest.mark.parametrize("kind", ["zero", "pattern"])
def test_sweep_without_attention_shortcut_equals_unbatched(which, kind, tiny_model, tiny_gpt2, monkeypatch):
    """With the ablated layer's attention recomputed (edits applied at the per-head site inside the trace,
    only the blocks below skipped), the sweep still equals per-head ablation to 1e-5."""
    import interventions.primitives.sweep as S

    monkeypatch.setattr(S, "_ATTN_SHORTCUT", False)
    model = tiny_model if which == "attn_only" else tiny_gpt2
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(6))
    clean, delta = ablation_sweep(model, tokens, kind=kind, heads_per_pass=3)
    ref_clean, ref_delta = _oracle(model, tokens, kind, all_heads(2, 4), None)
    torch.testing.assert_close(clean, ref_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta, ref_delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shortcut", [True, False])
def test_sweep_shares_the_clean_prefix(tiny_model, monkeypatch, shortcut):
    """Blocks below a group's layer never run in its pass (their clean output is reused), and one clean
    pass serves the clean loss: layer 0's block runs for the clean pass and the layer-0 group only; with
    the shortcut, each layer's attention runs only on the clean pass and in passes of lower layers."""
    import interventions.primitives.sweep as S

    monkeypatch.setattr(S, "_ATTN_SHORTCUT", shortcut)
    rows = {"block0": [], "block1": [], "attn0": [], "attn1": []}

    def counting(name, module):  # count real forward calls (a skipped module's forward never runs)
        forward = module.forward

        def f(x, *args, **kwargs):
            # not the engine's once-per-model take-effect probes (2 tokens), nor the shortcut's check (1 row)
            if x.shape[1] != 2 and x.shape[0] != 1:
                rows[name].append(x.shape[0])
            return forward(x, *args, **kwargs)
        return f

    for i, block in enumerate(tiny_model.transformer.h):  # patched before the sweep wraps the model
        block.forward = counting(f"block{i}", block)
        block.attn.forward = counting(f"attn{i}", block.attn)
    ablation_sweep(tiny_model, torch.randint(0, 50, (3, 8)), heads_per_pass=4)
    assert rows["block0"] == [3, 12]  # clean pass, layer-0 group (4 heads x 3 rows); skipped for layer 1
    assert rows["block1"] == [3, 12, 12]
    if shortcut:
        assert rows["attn0"] == [3] and rows["attn1"] == [3, 12]
    else:
        assert rows["attn0"] == [3, 12] and rows["attn1"] == [3, 12, 12]


@pytest.mark.parametrize("which", ["attn_only", "gpt2"])
def test_sweep_accepts_any_ablation(which, tiny_model, tiny_gpt2):
    """A factory heads -> PatternPreserving(MeanAblation(heads, reference)), a FunctionAblation (a
    function of the activation it replaces) and a ResampleAblation object are swept exactly as
    ablating each head alone with per_token_loss (< 1e-5)."""
    from interventions import FunctionAblation, ResampleAblation

    model = tiny_model if which == "attn_only" else tiny_gpt2
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(7))
    reference = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(8))
    heads = all_heads(2, 4)
    makers = {
        "pp-mean": lambda hs: PatternPreserving(MeanAblation(hs, reference)),
        "function": lambda hs: FunctionAblation(hs, lambda z, head: -2.0 * z),
        "resample": lambda hs: ResampleAblation(hs, reference, seed=1),
    }
    for name, make in makers.items():
        clean, delta = ablation_sweep(model, tokens, kind=make, heads_per_pass=3, batch_size=2)
        want = torch.stack([per_token_loss(model, tokens, make([h])) - clean for h in heads])
        torch.testing.assert_close(delta, want, atol=1e-5, rtol=0, msg=name)
    _, delta = ablation_sweep(model, tokens, kind=ResampleAblation(heads[:3], reference, seed=1))
    assert delta.shape == (3, 3, 9)


def test_loss_from_logits_chunks_rows_bit_identically(monkeypatch):
    """Chunking the float copy of the logits by rows (large vocabularies) changes nothing: the loss equals
    torch's cross-entropy, and the chunked result equals the one-chunk result bit for bit."""
    import torch.nn.functional as F

    from interventions.primitives import loss as L

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g, dtype=torch.bfloat16)
    tokens = torch.randint(0, 11, (5, 7), generator=g)
    whole = L.loss_from_logits(logits, tokens)
    monkeypatch.setattr(L, "LOSS_CHUNK_ELEMENTS", 2 * 7 * 11)  # 2 rows per chunk: 3 chunks
    chunked = L.loss_from_logits(logits, tokens)
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), tokens[:, 1:].reshape(-1), reduction="none")
    assert torch.equal(whole, chunked)
    torch.testing.assert_close(chunked.reshape(-1), ref)


def test_an_adapter_claiming_attn_is_o_proj_wrongly_is_refused_not_swept_silently_wrong():
    """A Llama whose attention adds a term after o_proj, registered as the unsupported-architecture hint
    suggests (attn_is_o_proj=True), would get the shortcut's deltas, silently wrong: refused naming the fix,
    once seen; registered with attn_is_o_proj=False the sweep equals per-head ablation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from interventions import ArchSpec, InterventionError, register_adapter
    from interventions.engine.adapters import ARCHS

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         hidden_size=32, intermediate_size=64, vocab_size=50)).eval()

    attention = type(model.model.layers[0].self_attn)

    class Extra(attention):  # adds a term after the output projection in its forward, as some attention modules do
        def forward(self, hidden_states, *args, **kwargs):
            out = super().forward(hidden_states, *args, **kwargs)
            return (out[0] + 0.3 * hidden_states, *out[1:])

    for layer in model.model.layers:
        layer.self_attn.__class__ = Extra
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    model.config.model_type = "my_llama"
    spec = dict(layers="model.layers", attn="self_attn", o_proj="o_proj", k_proj="k_proj", final_norm="model.norm")
    try:
        register_adapter("my_llama", ArchSpec(**spec, attn_is_o_proj=True))
        with pytest.raises(InterventionError, match=r"attn_is_o_proj=False"):
            ablation_sweep(model, tokens, heads=["L1H0", "L1H2"])
        register_adapter("my_llama", ArchSpec(**spec, attn_is_o_proj=False))
        clean, delta = ablation_sweep(model, tokens, heads=["L1H0", "L1H2"])
        want_clean, want = _oracle(model, tokens, "zero", ["L1H0", "L1H2"], None)
    finally:
        ARCHS.pop("my_llama")
    torch.testing.assert_close(clean, want_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta, want, atol=1e-5, rtol=0)
