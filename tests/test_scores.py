"""Head scores on hand-built circuits, against TransformerLens' head detector, and on bad inputs.

The hand-built models use disjoint subspaces of a 128-wide residual stream (V = 24 tokens):
  * token subspace, dims [0, 48): token t is e[2t] - e[2t+1];
  * previous-token subspace, dims [48, 96): the same code shifted by 48;
  * three positional dims [96, 99) holding (1, p, p^2), which (Shortformer positions) enter only the
    query/key inputs, never the residual stream.
Every residual vector then has zero mean and the same norm at every position (sqrt 2 before layer 0,
2 before layer 1), so each LayerNorm (weight 1, bias 0) is an exact uniform rescaling, compensated in
the weights below; it never changes which key wins.
  * L0H0, previous-token head: q_i . k_j / sqrt(d_head) = 20 (2 (i-1) j - j^2) = -20 (j - (i-1))^2 + a
    row constant, so softmax puts 1 - 2e-20 on j = i - 1; its OV copies the token code into the
    previous-token subspace.
  * L0H1 and (for values) L1H1: all-zero weights, i.e. exactly uniform attention and no output.
  * L1H0, induction head (K-composition): query = current token code, key = previous-token code,
    q . k / sqrt(d_head) = 30 on a match, 0 otherwise; OV copies the token subspace, which the
    unembedding reads (W_U = W_E), so its copying score is 1.
  * L1H1, duplicate-token head: query = key = current token code (it also matches itself, so it splits
    attention evenly between itself and the earlier copy).
"""


import numpy as np
import pandas as pd
import pytest
import torch

from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
from interventions.analysis.scores import (classify_induction_heads, copying_score, duplicate_token_score, head_scores,
                                  induction_score, prefix_matching_score, previous_token_score,
                                  probe_token_pool, repeated_random_tokens)

from .oracle import to_hooked_transformer

V, D, DH, N_CTX = 24, 128, 64, 128
TOK0, PREV0, POS0 = 0, 2 * V, 4 * V
BOS = 0
POOL = torch.arange(1, V)  # probe tokens: every id but BOS


def _code(base):
    m = torch.zeros(V, D)
    t = torch.arange(V)
    m[t, base + 2 * t], m[t, base + 2 * t + 1] = 1.0, -1.0
    return m


def circuit_model(n_layers=2, prev_scale=20.0, match=30.0):
    """The hand-built model of the module docstring (1 layer: the previous-token layer only)."""
    cfg = AttnOnlyConfig(n_layers=n_layers, n_heads=2, d_model=D, d_head=DH, n_ctx=N_CTX, vocab_size=V,
                         positional="shortformer")
    model = AttnOnlyForCausalLM(cfg).eval()
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith(("ln_1.weight", "ln_f.weight")):
            sd[k].fill_(1.0)
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = _code(TOK0)
    p = torch.arange(N_CTX, dtype=torch.float32)
    sd["transformer.wpe.weight"][:, POS0:POS0 + 3] = torch.stack([torch.ones_like(p), p, p ** 2], dim=1)
    rt = DH ** 0.5

    def zeros():
        return torch.zeros(2 * DH, D), torch.zeros(2 * DH, D), torch.zeros(2 * DH, D), torch.zeros(D, 2 * DH)

    wq, wk, wv, wo = zeros()  # layer 0
    wq[0, POS0 + 1], wq[0, POS0], wq[1, POS0] = 2 * prev_scale * rt, -2 * prev_scale * rt, -prev_scale * rt
    wk[0, POS0 + 1], wk[1, POS0 + 2] = 1.0, 1.0
    for d in range(2 * V):  # OV: token code -> previous-token subspace, undoing ln_1's gain sqrt(D / 2)
        wv[d, TOK0 + d] = 1.0
        wo[PREV0 + d, d] = (D / 2) ** -0.5
    layers = [(wq, wk, wv, wo)]
    if n_layers > 1:
        wq, wk, wv, wo = zeros()
        alpha = match * rt / (2 * D / 4)  # ln_1 gain^2 = D / 4 (residual norm 2); codes overlap by 1 (+1 entry)
        for t in range(V):
            wq[t, TOK0 + 2 * t], wk[t, PREV0 + 2 * t] = alpha, 1.0  # L1H0: induction
            wq[DH + t, TOK0 + 2 * t], wk[DH + t, TOK0 + 2 * t] = alpha, 1.0  # L1H1: duplicate token
        for d in range(2 * V):  # L1H0 OV: copy the token subspace
            wv[d, TOK0 + d] = 1.0
            wo[TOK0 + d, d] = 1.0
        layers.append((wq, wk, wv, wo))
    for i, (wq, wk, wv, wo) in enumerate(layers):
        a = f"transformer.h.{i}.attn."
        sd[a + "q_proj.weight"], sd[a + "k_proj.weight"] = wq, wk
        sd[a + "v_proj.weight"], sd[a + "c_proj.weight"] = wv, wo
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope="module")
def circuit():
    return circuit_model(2)


def _score(df, layer, head, column="score"):
    return float(df[(df["layer"] == layer) & (df["head"] == head)][column].iloc[0])


def _uniform_chance(queries_targets):
    """Mean over (query position q, number of target keys) of n_targets / (q + 1): uniform attention."""
    return sum(n / (q + 1) for q, n in queries_targets) / len(queries_targets)


def test_previous_token_head_one_layer():
    """1-layer model: L0H0 attends to the previous token (score > 0.999); the all-zero head L0H1 attends
    uniformly, so its score equals the chance level mean_i 1 / (i + 1), i = 1..pos-1, exactly."""
    model = circuit_model(1)
    windows = torch.randint(0, V, (5, 100), generator=torch.Generator().manual_seed(0))
    df = previous_token_score(model, windows, batch_size=2)
    assert list(df.columns) == ["layer", "head", "score"] and len(df) == 2
    assert _score(df, 0, 0) > 0.999
    assert _score(df, 0, 1) == pytest.approx(_uniform_chance([(i, 1) for i in range(1, 100)]), abs=1e-6)


def test_induction_circuit(circuit):
    """2-layer circuit: L1H0 has induction, prefix-matching and copying scores ~1 and is the only head
    classified as induction; L0H0 is the previous-token head; L1H1 splits its attention between itself
    and the earlier copy (duplicate-token 0.5); the uniform head L0H1 sits at chance exactly."""
    L, T, R = 20, 10, 4
    windows = torch.randint(0, V, (4, 60), generator=torch.Generator().manual_seed(1))
    df = head_scores(circuit, windows, n_examples=4, bos_id=BOS, token_pool=POOL, seq_len=L, prefix_tokens=T,
                     n_repeats=R, batch_size=3)
    assert list(df.columns) == ["layer", "head", "prefix_matching", "copying", "copying_raw", "induction",
                                "duplicate_token", "previous_token"]
    assert _score(df, 1, 0, "induction") > 0.999 and _score(df, 1, 0, "prefix_matching") > 0.999
    assert _score(df, 1, 0, "copying") == pytest.approx(1.0)
    assert _score(df, 0, 0, "previous_token") > 0.999
    assert _score(df, 1, 1, "duplicate_token") == pytest.approx(0.5, abs=1e-4)
    for layer, head in ((0, 0), (1, 1)):  # attention elsewhere: ~0 induction / prefix matching
        assert _score(df, layer, head, "induction") < 1e-4 and _score(df, layer, head, "prefix_matching") < 1e-4
    second_copy = [(q, 1) for q in range(L + 1, 2 * L + 1)]
    assert _score(df, 0, 1, "induction") == pytest.approx(_uniform_chance(second_copy), abs=1e-6)
    assert _score(df, 0, 1, "duplicate_token") == pytest.approx(_uniform_chance(second_copy), abs=1e-6)
    repeats = [(1 + r * T + o, r) for r in range(1, R) for o in range(T)]  # repeat r has r earlier copies
    assert _score(df, 0, 1, "prefix_matching") == pytest.approx(_uniform_chance(repeats), abs=1e-6)
    assert _score(df, 0, 1, "prefix_matching") < 2 / T
    for layer, head in ((0, 0), (0, 1), (1, 1)):  # no OV output at all -> share 0 -> -1
        assert _score(df, layer, head, "copying") == -1.0
    marked = classify_induction_heads(df)
    assert marked[marked.is_induction][["layer", "head"]].values.tolist() == [[1, 0]]


def test_scores_seeded_and_batch_invariant(circuit):
    """Same seed, same probe tokens, same scores for any batch size; another seed draws other tokens."""
    kw = dict(seq_len=8, n_examples=5, bos_id=BOS, token_pool=POOL)
    a = induction_score(circuit, seed=3, batch_size=2, **kw)
    b = induction_score(circuit, seed=3, batch_size=16, **kw)
    assert torch.allclose(torch.tensor(a.score.values), torch.tensor(b.score.values), atol=1e-7)
    t1 = repeated_random_tokens(POOL, 8, 2, 5, BOS, seed=3)
    assert torch.equal(t1, repeated_random_tokens(POOL, 8, 2, 5, BOS, seed=3))
    assert not torch.equal(t1, repeated_random_tokens(POOL, 8, 2, 5, BOS, seed=4))
    assert (t1[:, 0] == BOS).all() and torch.equal(t1[:, 1:9], t1[:, 9:])
    assert all(len(set(row[1:9].tolist())) == 8 for row in t1)  # distinct within a copy


def test_repeated_random_tokens_refuses_bool_counts_and_takes_numpy_integers():
    """A bool count is refused naming the argument (before: n_tokens=True passed as 1, an int subclass);
    a numpy integer count draws what the int does; counts below the minimum are still refused."""
    for kw, match in ((dict(n_tokens=True), "n_tokens=True must be a positive integer"),
                      (dict(n_repeats=True), "n_repeats=True must be an integer >= 2"),
                      (dict(n_examples=False), "n_examples=False must be a positive integer"),
                      (dict(n_repeats=1), "n_repeats=1 must be an integer >= 2"),
                      (dict(n_tokens=2.0), r"n_tokens=2\.0 must be a positive integer")):
        with pytest.raises(ValueError, match=match):
            repeated_random_tokens(POOL, **{**dict(n_tokens=3, n_repeats=2, n_examples=2), **kw}, bos_id=BOS)
    t = repeated_random_tokens(POOL, np.int64(3), np.int32(2), np.int64(2), BOS, distinct=False)
    assert torch.equal(t, repeated_random_tokens(POOL, 3, 2, 2, BOS, distinct=False)) and t.shape == (2, 7)


def test_probe_lengths_take_numpy_integers(circuit):
    """A numpy integer probe length scores what the int does (it was refused, while the probe's counts took
    one); a bool and a length below 3 are still refused, with the reason."""
    kw = dict(n_examples=3, bos_id=BOS, token_pool=POOL)
    want = induction_score(circuit, seq_len=8, **kw)
    pd.testing.assert_frame_equal(induction_score(circuit, seq_len=np.int64(8), **kw), want)
    pd.testing.assert_frame_equal(duplicate_token_score(circuit, seq_len=np.int32(8), **kw),
                                  duplicate_token_score(circuit, seq_len=8, **kw))
    for bad in (True, 2):
        with pytest.raises(ValueError, match=rf"seq_len={bad!r} must be an integer >= 3: with 1 or 2 repeated"):
            induction_score(circuit, seq_len=bad, **kw)


def test_copying_sign(circuit):
    """Flipping the OV circuit of the copying head (writing -token) turns copying 1 into -1."""
    flipped = circuit_model(2)
    with torch.no_grad():
        flipped.transformer.h[1].attn.c_proj.weight.neg_()
    assert _score(copying_score(circuit), 1, 0) == 1.0
    assert _score(copying_score(flipped), 1, 0) == -1.0


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _copier(arch, flip=False):
    """A hand-built ``arch`` model (vocab 12, codes e[2t] - e[2t+1] in a 128-wide residual stream,
    embedding = unembedding, every other weight 0, norm gains 1) whose last-layer head 0 copies the
    token subspace through its OV circuit (negated when ``flip``); every other head writes nothing.
    Weights are written here per architecture, independently of the library."""
    import transformers as T

    v, d, dh = 12, 128, 32
    common = dict(vocab_size=v, hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=16,
                  max_position_embeddings=64)
    model = {"gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=v, n_embd=d, n_layer=2, n_head=4, n_positions=64)),
             "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common)),
             "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False,
                                                              **common))}[arch]().eval()
    code = torch.zeros(v, d)
    code[torch.arange(v), 2 * torch.arange(v)], code[torch.arange(v), 2 * torch.arange(v) + 1] = 1.0, -1.0
    wv, wo = torch.zeros(dh, d), torch.zeros(d, dh)  # head 0: v = x[:24], o = (+/-) v back into [:24]
    wv[torch.arange(2 * v), torch.arange(2 * v)] = 1.0
    wo[torch.arange(2 * v), torch.arange(2 * v)] = -1.0 if flip else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if ("norm" in name or "ln_" in name) and name.endswith("weight") else
                    torch.zeros_like(p))
        model.get_input_embeddings().weight.copy_(code)
        model.get_output_embeddings().weight.copy_(code)
        if arch == "gpt2":
            attn = model.transformer.h[1].attn  # Conv1D: y = x @ W; c_attn columns [q | k | v]
            attn.c_attn.weight[:, 2 * d: 2 * d + dh] = wv.T
            attn.c_proj.weight[:dh] = wo.T
        elif arch == "gpt_neox":
            attn = model.gpt_neox.layers[1].attention  # rows per head [q_h | k_h | v_h]
            attn.query_key_value.weight[2 * dh: 3 * dh] = wv
            attn.dense.weight[:, :dh] = wo
        else:
            attn = model.model.layers[1].self_attn  # kv head 0 serves query heads 0 and 1
            attn.v_proj.weight[:dh] = wv
            attn.o_proj.weight[:, :dh] = wo
    return model


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_copying_score_on_hand_built_weights(arch):
    """On every architecture (Llama with grouped-query attention), the hand-built copying head scores
    1, its negation -1, and heads that write nothing -1."""
    for flip, want in ((False, 1.0), (True, -1.0)):
        df = copying_score(_copier(arch, flip), bos_id=0, token_pool=torch.arange(1, 12))
        assert _score(df, 1, 0) == pytest.approx(want, abs=1e-6), (arch, flip)
        assert all(_score(df, layer, head) == -1.0 for layer in range(2) for head in range(4)
                   if (layer, head) != (1, 0))


def test_copying_score_refuses_a_final_norm_of_another_formula():
    """Gemma's RMSNorm scales by 1 + weight (its weight is 0 at initialisation): registered with
    final_norm, the copying score raises ValueError naming final_norm instead of freezing the norm as
    weight * x / rms(x) (which made every head write nothing: -1 each, silently)."""
    import transformers as T

    from interventions import ArchSpec, register_adapter
    from interventions.engine.adapters import ARCHS

    torch.manual_seed(0)
    model = T.GemmaForCausalLM(T.GemmaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                             max_position_embeddings=64)).eval()
    register_adapter("gemma", ArchSpec(layers="model.layers", attn="self_attn", o_proj="o_proj", k_proj="k_proj",
                                       final_norm="model.norm"))
    try:
        with pytest.raises(ValueError, match="GemmaRMSNorm.*final_norm"):
            copying_score(model, bos_id=0, token_pool=torch.arange(1, 40))
    finally:
        ARCHS.pop("gemma")


def test_scores_run_on_gpt2():
    """GPT-2 (another architecture) gets every score through observable(): one row per head, in range."""
    model = _gpt2()
    df = head_scores(model, torch.randint(0, 40, (2, 16)), n_examples=2, seq_len=8, prefix_tokens=5, n_repeats=3)
    assert len(df) == 4 and df[["prefix_matching", "induction", "previous_token"]].le(1).all().all()
    assert df.copying.between(-1, 1).all()


def _tl_with_tokenizer(model, tmp_path):
    """A HookedTransformer of the same weights with the byte tokenizer attached (loaded from a saved
    folder: TL needs name_or_path). Right padding: with left padding TL masks leading pad tokens, and
    our pad token is the BOS/separator, so it would mask the BOS."""
    from interventions.zoo.tokenizer import byte_tokenizer, load_tokenizer

    byte_tokenizer().save_pretrained(tmp_path)
    tl = to_hooked_transformer(model)
    tl.set_tokenizer(load_tokenizer(str(tmp_path)), default_padding_side="right")
    return tl


def test_agrees_with_transformer_lens_detect_head(tmp_path):
    """On identical weights and token sequences, our scores equal TransformerLens' detect_head
    (error_measure="mul") rescaled to its normalisation. detect_head divides the attention on its
    detection pattern by the *sum of the whole pattern*, i.e. by all pos query rows, where we average
    over the scored queries only. With distinct tokens within a repeat and a unique BOS its patterns
    have exactly one target per scored query, so:
      induction / duplicate (2 copies of L, pos 2L+1):  TL = L / (2L + 1) * ours
      prefix matching vs TL "induction_head" on R repeats of T: TL = (R-1) T / (RT + 1) * ours
      previous token on windows of pos tokens:        TL = (pos - 1) / pos * ours
    detect_head on a list of strings averages per string, as we average per example."""
    from transformer_lens.head_detector import detect_head
    from interventions.zoo.tokenizer import SEP

    torch.manual_seed(0)
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=4, d_model=32, n_ctx=64, vocab_size=257,
                                               init_range=0.3)).eval()
    tl = _tl_with_tokenizer(model, tmp_path)
    ascii_ = dict(bos_id=256, vocab_range=(33, 127), n_examples=3, seed=0)  # printable ASCII: strings round-trip
    pool = probe_token_pool(257, vocab_range=(33, 127), exclude_ids=(256,))

    def strings(tokens):
        strs = [SEP + bytes(r[1:].tolist()).decode("ascii") for r in tokens]
        assert torch.equal(tl.to_tokens(strs), tokens)
        return strs

    def close(ours, theirs, factor):
        assert torch.allclose(torch.tensor(ours.score.values, dtype=torch.float32) * factor, theirs.flatten(),
                              atol=1e-5)

    L = 12
    strs = strings(repeated_random_tokens(pool, L, 2, 3, 256, seed=0))
    close(induction_score(model, seq_len=L, **ascii_), detect_head(tl, strs, "induction_head"), L / (2 * L + 1))
    close(duplicate_token_score(model, seq_len=L, **ascii_), detect_head(tl, strs, "duplicate_token_head"),
          L / (2 * L + 1))
    T, R = 8, 4
    strs = strings(repeated_random_tokens(pool, T, R, 3, 256, seed=0))
    close(prefix_matching_score(model, n_tokens=T, n_repeats=R, **ascii_), detect_head(tl, strs, "induction_head"),
          (R - 1) * T / (R * T + 1))
    windows = torch.randint(33, 127, (3, 30), generator=torch.Generator().manual_seed(2))
    texts = [bytes(r.tolist()).decode("ascii") for r in windows]
    assert torch.equal(tl.to_tokens(texts), windows)
    close(previous_token_score(model, windows), detect_head(tl, texts, "previous_token_head"), 29 / 30)


def test_probe_token_pool():
    """Without frequencies the lowest and highest ids are left out; with counts the most and least
    common; vocab_range is taken as given; excluded ids (BOS) never appear."""
    assert probe_token_pool(100, exclude_top=0.1).tolist() == list(range(10, 90))
    counts = torch.arange(100, 0, -1)  # id 0 most common
    assert probe_token_pool(100, exclude_top=0.1, token_counts=counts).tolist() == list(range(10, 90))
    counts = torch.arange(100)  # id 99 most common
    assert probe_token_pool(100, exclude_top=0.2, token_counts=counts).tolist() == list(range(20, 80))
    assert probe_token_pool(100, vocab_range=(5, 9), exclude_ids=(6,)).tolist() == [5, 7, 8]


def test_bad_inputs_raise(circuit):
    """A vocabulary too small for the probe, a context too short, a bad BOS, an unsupported
    architecture, and a table without the needed columns all raise, naming the fix (a Llama model,
    once without a copying score, has one)."""
    with pytest.raises(ValueError, match="vocabulary is too small.*token_pool"):
        induction_score(circuit, seq_len=50, bos_id=BOS)
    with pytest.raises(ValueError, match="model's context is 128"):
        prefix_matching_score(circuit, n_tokens=20, n_repeats=7, bos_id=BOS, token_pool=POOL)
    with pytest.raises(ValueError, match="n_repeats"):
        prefix_matching_score(circuit, n_tokens=5, n_repeats=1, bos_id=BOS, token_pool=POOL)
    with pytest.raises(ValueError, match="bos_id"):
        induction_score(circuit, seq_len=5, bos_id=V)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        previous_token_score(circuit, torch.zeros(2, 1, dtype=torch.long))

    class Mystery(torch.nn.Module):
        config = type("Config", (), {"model_type": "mystery"})()

    with pytest.raises(ValueError, match="unsupported architecture 'mystery'"):
        induction_score(Mystery(), seq_len=5, bos_id=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=40))
    assert copying_score(llama.eval()).score.between(-1, 1).all()  # every architecture has a copying score
    with pytest.raises(ValueError, match="head_scores"):
        classify_induction_heads(pd.DataFrame({"layer": [0], "head": [0], "induction": [0.9]}))


def test_probes_inferred_from_a_run_folder(tmp_path):
    """A model loaded from a run's checkpoint folder finds the tokenizer saved beside it: BOS is the
    separator (256), probes are printable bytes only (no control or non-ASCII bytes, no BOS), and
    without a tokenizer every id but BOS is a candidate."""
    from transformers import AutoModelForCausalLM

    from interventions.analysis.scores import _bos, find_tokenizer, inferred_pool
    from interventions.zoo.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=64, vocab_size=257)).eval()
    assert find_tokenizer(model) is None and _bos(model, None) == 0
    bare = inferred_pool(model, bos_id=0)
    assert 0 not in bare.tolist() and bare.numel() > 150
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000010"
    model.save_pretrained(ckpt)
    byte_tokenizer().save_pretrained(tmp_path / "run" / "tokenizer")
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert _bos(loaded, None) == 256
    pool = inferred_pool(loaded, bos_id=256).tolist()
    assert pool and all(33 <= t <= 126 for t in pool) and len(pool) >= 50


@pytest.mark.parametrize("vocab, tokenizer_beside, says", [
    (100, False, r"50256 \(the model's config.bos_token_id\) is outside the vocabulary \[0, 100\): pass bos_id=ID, "
                 r"the BOS id of the model's own tokenizer \(tokenizer.bos_token_id"),
    (257, False, r"vocabulary of 257 is byte-level: pass bos_id=256 \(the separator of byte_tokenizer\(\)\)"),
    (100, True, r"256 \(the model's tokenizer.bos_token_id\).*the tokenizer found beside the model .* does not fit it"),
])
def test_a_bos_id_outside_the_vocabulary_is_told_the_fix_of_its_case(tmp_path, monkeypatch, vocab, tokenizer_beside,
                                                                      says):
    """An inferred BOS id outside the vocabulary names where it came from and that case's fix: a GPT-2
    config's 50256 over a smaller vocabulary, or a tokenizer beside the model that does not fit it, is
    not told to use byte_tokenizer()'s 256 (wrong advice there); a byte-level vocabulary of 257 is."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from interventions.analysis.scores import probe_sequences
    from interventions.zoo.tokenizer import byte_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=0) if tokenizer_beside else {}
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=vocab, **ids)).eval()
    if tokenizer_beside:  # a byte tokenizer (BOS 256) saved beside a model of 100 ids
        model.save_pretrained(tmp_path / "model")
        byte_tokenizer().save_pretrained(tmp_path / "model")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with pytest.raises(ValueError, match=says) as e:
        probe_sequences(model, 5, 2)
    assert ("byte_tokenizer" in str(e.value)) == (vocab == 257)


def test_printable_ids_leave_out_added_special_tokens():
    """Tokens added as special (AddedToken(special=True), as Llama 3's reserved and chat tokens are)
    but not named in the special-tokens map are missing from all_special_ids; they are special all
    the same and never probes. A plain added token (special=False) stays a candidate."""
    from transformers import AddedToken

    from interventions.analysis.scores import printable_ids
    from interventions.zoo.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_tokens([AddedToken("<|reserved_0|>", special=True), AddedToken("<|header|>", special=True),
                    AddedToken("plain", special=False)])
    assert tok.all_special_ids == [256]  # the added special tokens are not listed there
    ids = printable_ids(tok).tolist()
    assert [i for i in ids if i >= 256] == [259]
    assert ids[:-1] == list(range(33, 127))  # printable ASCII, nothing else below BOS


def test_short_context_model_is_told_how_to_classify():
    """classify_induction_heads(model) on a context shorter than the default probes (101 positions) names the
    arguments that shorten them and the way to classify with them; with those, it classifies."""
    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=60, n_ctx=64)).eval()
    with pytest.raises(ValueError, match=r"context is 64.*head_scores\(model, prefix_tokens=.*classify_induction_heads"):
        classify_induction_heads(model)
    table = head_scores(model, prefix_tokens=10, n_repeats=3, seq_len=20)
    assert len(classify_induction_heads(table)) == 2


def test_a_final_norm_the_copying_score_cannot_freeze_gets_advice_that_works():
    """The refusal of a final norm of another formula advised registering without final_norm, which only
    led to the refusal of a missing final norm (advising to add it): the message now names the scores
    that need no final norm, and they run on the model."""
    import transformers as T

    from interventions import ArchSpec, register_adapter
    from interventions.analysis.scores import prefix_matching_score
    from interventions.engine.adapters import ARCHS

    torch.manual_seed(0)
    model = T.GemmaForCausalLM(T.GemmaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                             max_position_embeddings=64)).eval()
    messages = []
    try:
        for final_norm in ("model.norm", None):
            register_adapter("gemma", ArchSpec(layers="model.layers", attn="self_attn", o_proj="o_proj",
                                               k_proj="k_proj", final_norm=final_norm))
            with pytest.raises(ValueError) as e:
                copying_score(model, bos_id=0, token_pool=torch.arange(1, 40))
            messages.append(str(e.value))
        assert "without final_norm" not in messages[0]
        assert all("prefix_matching_score" in m for m in messages)
        assert prefix_matching_score(model, n_tokens=10, bos_id=0, token_pool=torch.arange(1, 40)).shape == (8, 3)
    finally:
        ARCHS.pop("gemma")


def test_the_unsupported_architecture_hint_registers_a_working_adapter():
    """The error for an unknown model type suggests a register_adapter call; run as written on a renamed
    Llama, it gives an adapter on which head_scores (copying included: it needs the final norm) works and
    equals the built-in Llama adapter's scores."""
    import re

    import interventions
    from transformers import LlamaConfig, LlamaForCausalLM

    from interventions.engine.adapters import ARCHS

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=120, max_position_embeddings=256)).eval()
    want = head_scores(llama, bos_id=0)
    llama.config.model_type = "hint_llama"
    try:
        with pytest.raises(ValueError, match="unsupported architecture 'hint_llama'") as err:
            head_scores(llama, bos_id=0)
        call = re.search(r"(interventions\.register_adapter\(.*\)\))\s+#", str(err.value)).group(1)
        exec(call, {"interventions": interventions})
        got = head_scores(llama, bos_id=0)
        pd.testing.assert_frame_equal(got, want)
    finally:
        ARCHS.pop("hint_llama", None)


def test_head_scores_on_a_short_context_suggests_arguments_that_fit():
    """head_scores on a context too short for its probes is refused before any forward pass, naming
    head_scores' own arguments (the prefix-matching check used to say "seq_len=25" for prefix_tokens, and a
    too-long seq_len was found only after the prefix-matching and copying passes had run) with values that
    fit: the call it suggests runs."""
    import re

    model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=60, n_ctx=64)).eval()
    for kwargs in ({}, {"prefix_tokens": 15}):
        with pytest.raises(ValueError) as e:
            head_scores(model, **kwargs)
        msg = str(e.value)
        assert "context is 64" in msg and "seq_len=50" in msg and "classify_induction_heads" in msg
        assert ("prefix_tokens=25" in msg) == (not kwargs)
        suggested = re.search(r"head_scores\(model, (prefix_tokens=\d+, n_repeats=\d+, seq_len=\d+)\)", msg)
        assert suggested, msg
        fit = {k: int(v) for k, v in (p.split("=") for p in suggested.group(1).split(", "))}
        assert fit == {"prefix_tokens": kwargs.get("prefix_tokens", 15), "n_repeats": 4, "seq_len": 31}
        assert len(head_scores(model, **fit)) == 2
