"""Per-head scores: prefix matching, copying, induction, duplicate-token and previous-token.

Each score function returns a tidy DataFrame with one row per (layer, head): columns ``layer``,
``head``, ``score`` (``copying_score`` adds ``raw``). ``head_scores`` joins them into one wide table
and ``classify_induction_heads`` marks induction heads on it.

Attention scores are read from the attention patterns of the toolkit's own traces
(pattern sites read inside ``observable(model)``), so they work for every
architecture ``interventions.engine.adapters`` supports. The copying score is read from the weights (it is a
property of the OV circuit, no forward pass); it supports our ``attn_only`` model and GPT-2.

Definitions (Olsson et al. 2022; see shared/notes/reference.md):

* **prefix matching**: ``n_tokens`` random tokens repeated ``n_repeats`` times after a BOS. For each
  query in repeats 2..n_repeats, the attention it pays to every position that *followed* an earlier
  occurrence of its own token, summed over those positions, averaged over queries and examples.
  Chance (uniform attention) is about 1 / n_tokens.
* **induction** (TransformerLens / ARENA style): ``seq_len`` random tokens repeated twice after a BOS;
  the mean of the pattern's diagonal at offset 1 - seq_len over the second copy's queries (positions
  seq_len + 1 .. 2 seq_len), i.e. attention to the token after the previous copy of the current one.
* **duplicate token**: same sequences; mean attention from each second-copy token to its own earlier
  position (offset -seq_len).
* **previous token**: mean attention from position i to i - 1 (i >= 1) on ordinary text windows.
* **copying**: see ``copying_score``.

Random tokens within one repeat are drawn *without* replacement, so each query has exactly one
earlier occurrence per earlier repeat and the diagonal definitions equal the token-matching ones
(TransformerLens' ``detect_head`` patterns); the tests check that equivalence.

Example:
    >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=60)).eval()
    >>> induction_score(model, seq_len=10, n_examples=2).shape
    (4, 3)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..engine.adapters import get_adapter, observable
from ..engine.sites import Site
from ..engine.tracing import Engine, Run, unwrap

ScoreName = Literal["prefix_matching", "copying", "induction", "duplicate_token", "previous_token"]

# Default thresholds of ``classify_induction_heads`` (the paper gives none; reasons in its docstring).
PREFIX_THRESHOLD = 0.4
COPYING_THRESHOLD = 0.0
# Fraction of the vocabulary left out at each end when drawing probe tokens (the paper excludes the
# most and least common tokens; 10% at each end keeps 80% of ids as candidates).
EXCLUDE_FRACTION = 0.1
COPYING_SUPPORTED = ("attn_only", "gpt2")


# ----------------------------------------------------------------------------- probe tokens

def probe_token_pool(vocab_size: int, *, exclude_top: float = EXCLUDE_FRACTION,
                     vocab_range: tuple[int, int] | None = None, token_counts=None,
                     exclude_ids=()) -> torch.Tensor:
    """Candidate ids for random probe tokens, without the most and least common tokens.

    * ``vocab_range=(lo, hi)``: ids lo .. hi - 1, as given (nothing else excluded but ``exclude_ids``).
    * ``token_counts`` (vocab,): corpus frequencies; the ``exclude_top`` fraction of most common and
      of least common ids is left out (ties broken by id).
    * neither: the model carries no frequency information, so the ``exclude_top`` fraction of lowest
      and of highest ids is left out. Rationale: BPE vocabularies number tokens by merge order (low ids
      are single bytes and common merges, the highest ids the rarest merges); for a byte tokenizer the
      ends are control bytes and non-ASCII bytes. Pass ``vocab_range`` or ``token_pool`` (in the score
      functions) when that does not fit your tokenizer.

    ``exclude_ids`` (e.g. the BOS id) are always removed. Returns a sorted LongTensor of ids."""
    if not 0 <= exclude_top < 0.5:
        raise ValueError(f"exclude_top={exclude_top} must be a fraction in [0, 0.5) excluded at each end")
    if vocab_range is not None:
        lo, hi = (int(v) for v in vocab_range)
        if not 0 <= lo < hi <= vocab_size:
            raise ValueError(f"vocab_range={tuple(vocab_range)} must satisfy 0 <= lo < hi <= vocab_size={vocab_size}")
        ids = torch.arange(lo, hi)
    else:
        cut = int(round(exclude_top * vocab_size))
        if token_counts is not None:
            counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64)
            if counts.shape != (vocab_size,):
                raise ValueError(f"token_counts has shape {tuple(counts.shape)}; expected ({vocab_size},), one count per id")
            order = torch.from_numpy(np.argsort(-counts.numpy(), kind="stable"))  # most common first
            ids = order[cut: vocab_size - cut].sort().values
        else:
            ids = torch.arange(cut, vocab_size - cut)
    excl = torch.as_tensor(list(exclude_ids), dtype=torch.long)
    if excl.numel():
        ids = ids[~torch.isin(ids, excl)]
    return ids


def _pool(model, n_needed: int, token_pool, exclude_top, vocab_range, token_counts, bos_id) -> torch.Tensor:
    a = get_adapter(unwrap(model))
    if token_pool is not None:
        pool = torch.as_tensor(np.asarray(token_pool), dtype=torch.long).flatten().unique()
        if pool.numel() and (int(pool.min()) < 0 or int(pool.max()) >= a.vocab_size):
            raise ValueError(f"token_pool holds ids outside the vocabulary [0, {a.vocab_size})")
        if bos_id is not None:
            pool = pool[pool != bos_id]
    else:
        pool = probe_token_pool(a.vocab_size, exclude_top=exclude_top, vocab_range=vocab_range,
                                token_counts=token_counts, exclude_ids=() if bos_id is None else (bos_id,))
    if pool.numel() < n_needed:
        raise ValueError(f"the vocabulary is too small to draw {n_needed} distinct random tokens: only "
                         f"{pool.numel()} candidate ids (vocab_size={a.vocab_size}, exclude_top={exclude_top}, "
                         f"vocab_range={vocab_range}). Use fewer tokens (n_tokens / seq_len <= {pool.numel()}), "
                         "a smaller exclude_top, a wider vocab_range, or pass token_pool")
    return pool


def _bos(model, bos_id: int | None) -> int:
    """``bos_id``, else the config's ``bos_token_id``, else its ``eos_token_id``, else 0."""
    inner = unwrap(model)
    a = get_adapter(inner)
    if bos_id is None:
        c = inner.config
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(c, name, None)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                bos_id = int(v)
                break
        else:
            bos_id = 0
        if not 0 <= bos_id < a.vocab_size:
            raise ValueError(f"the config's BOS id {bos_id} is outside the vocabulary [0, {a.vocab_size}): "
                             "pass bos_id (e.g. the tokenizer's separator, 256 for byte_tokenizer())")
    if not 0 <= int(bos_id) < a.vocab_size:
        raise ValueError(f"bos_id={bos_id} is outside the vocabulary [0, {a.vocab_size})")
    return int(bos_id)


def repeated_random_tokens(pool: torch.Tensor, n_tokens: int, n_repeats: int, n_examples: int,
                           bos_id: int, seed: int = 0) -> torch.Tensor:
    """(n_examples, 1 + n_tokens * n_repeats): BOS, then ``n_tokens`` distinct ids drawn (seeded) from
    ``pool``, repeated ``n_repeats`` times. Same seed, same tokens."""
    for name, v, lo in (("n_tokens", n_tokens, 1), ("n_repeats", n_repeats, 2), ("n_examples", n_examples, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
    if pool.numel() < n_tokens:
        raise ValueError(f"cannot draw {n_tokens} distinct tokens from a pool of {pool.numel()}: "
                         "use fewer tokens or a larger pool")
    g = torch.Generator().manual_seed(seed)
    rows = [pool[torch.randperm(pool.numel(), generator=g)[:n_tokens]] for _ in range(n_examples)]
    seg = torch.stack(rows)  # (n_examples, n_tokens)
    bos = torch.full((n_examples, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, seg.repeat(1, n_repeats)], dim=1)


def _check_length(model, length: int, what: str) -> None:
    n_ctx = get_adapter(unwrap(model)).n_ctx
    if n_ctx is not None and length > n_ctx:
        raise ValueError(f"{what} needs {length} positions but the model's context is {n_ctx}: "
                         "use fewer tokens / repeats")


# ----------------------------------------------------------------------------- attention scoring

def _frame(values: torch.Tensor, **extra):
    """(n_layers, n_heads) -> DataFrame rows layer, head, score (+ extra (n_layers, n_heads) columns)."""
    import pandas as pd

    n_layers, n_heads = values.shape
    df = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_heads),
                       "head": np.tile(np.arange(n_heads), n_layers),
                       "score": values.flatten().double().numpy()})
    for name, v in extra.items():
        df[name] = v.flatten().double().numpy()
    return df


@torch.no_grad()
def attention_score(model, tokens: torch.Tensor, target: torch.Tensor, n_queries: int,
                    batch_size: int = 16) -> torch.Tensor:
    """Attention each head pays to ``target`` positions, per query: (n_layers, n_heads).

    score[l, h] = sum over examples, queries q, keys k of pattern[b, h, q, k] * target[b, q, k],
    divided by (n_examples * n_queries). ``target`` is (n_examples or 1, pos, pos), zero on rows that
    are not scored queries; ``n_queries`` is the number of scored queries per example. Patterns come
    read inside ``observable(model)`` in batches of ``batch_size``."""
    a = get_adapter(unwrap(model))
    n = tokens.shape[0]
    totals = torch.zeros(a.n_layers, a.n_heads, dtype=torch.float64)
    engine = Engine(model)
    sites = [Site(layer, "pattern") for layer in range(a.n_layers)]
    with observable(engine.inner):
        for i in range(0, n, batch_size):
            batch = tokens[i:i + batch_size]
            tgt = target if target.shape[0] == 1 else target[i:i + batch_size]
            acts = engine.run(Run(batch, reads=sites)).acts
            for layer in range(a.n_layers):
                p = acts[f"L{layer}.pattern"]  # (batch, head, q_pos, k_pos)
                totals[layer] += (p.detach().double().cpu() * tgt[:, None].double()).sum(dim=(0, 2, 3))
    return totals / (n * n_queries)


def induction_targets(tokens: torch.Tensor) -> torch.Tensor:
    """(n, pos, pos) float: 1 at (q, j + 1) for every j < q with tokens[j] == tokens[q] (the tokens
    that followed earlier occurrences of the query's token); TransformerLens' induction pattern."""
    eq = tokens[:, :, None] == tokens[:, None, :]  # (n, q, k)
    pos = tokens.shape[1]
    eq &= torch.ones(pos, pos, dtype=torch.bool).tril(-1)
    out = torch.zeros(eq.shape, dtype=torch.float32)
    out[:, :, 1:] = eq[:, :, :-1].float()
    return out


def _diagonal_target(pos: int, offset: int, queries: range) -> torch.Tensor:
    t = torch.zeros(1, pos, pos)
    for q in queries:
        t[0, q, q + offset] = 1.0
    return t


def prefix_matching_score(model, n_tokens: int = 25, n_repeats: int = 4, n_examples: int = 10, seed: int = 0,
                          bos_id: int | None = None, exclude_top: float = EXCLUDE_FRACTION,
                          vocab_range: tuple[int, int] | None = None, token_pool=None, token_counts=None,
                          batch_size: int = 16):
    """Prefix-matching score of every head (the paper's induction-head criterion, part 1).

    Sequences: BOS + ``n_tokens`` distinct random tokens repeated ``n_repeats`` times (paper: 25 x 4,
    10 examples). Score: for each query in repeats 2..n_repeats, the attention summed over the
    positions that followed earlier occurrences of its token, averaged over queries and examples.
    1 = perfect prefix matching; uniform attention gives about 1 / n_tokens.

    Probe tokens come from ``token_pool`` if given, else ``probe_token_pool`` (``exclude_top``,
    ``vocab_range``, ``token_counts``); ``bos_id`` defaults to the config's BOS/EOS id, else 0.

    Returns a DataFrame: layer, head, score."""
    bos = _bos(model, bos_id)
    pool = _pool(model, n_tokens, token_pool, exclude_top, vocab_range, token_counts, bos)
    tokens = repeated_random_tokens(pool, n_tokens, n_repeats, n_examples, bos, seed)
    _check_length(model, tokens.shape[1], f"prefix matching ({n_tokens} tokens x {n_repeats} repeats + BOS)")
    target = induction_targets(tokens)
    target[:, : 1 + n_tokens] = 0  # score queries of repeats 2.. only
    return _frame(attention_score(model, tokens, target, n_tokens * (n_repeats - 1), batch_size))


def _twice_repeated(model, seq_len, n_examples, seed, bos_id, exclude_top, vocab_range, token_pool,
                    token_counts, what):
    bos = _bos(model, bos_id)
    pool = _pool(model, seq_len, token_pool, exclude_top, vocab_range, token_counts, bos)
    tokens = repeated_random_tokens(pool, seq_len, 2, n_examples, bos, seed)
    _check_length(model, tokens.shape[1], f"{what} (2 x seq_len={seq_len} + BOS)")
    return tokens


def induction_score(model, seq_len: int = 50, n_examples: int = 10, seed: int = 0, bos_id: int | None = None,
                    exclude_top: float = EXCLUDE_FRACTION, vocab_range: tuple[int, int] | None = None,
                    token_pool=None, token_counts=None, batch_size: int = 16):
    """TransformerLens-style induction score of every head.

    Sequences: BOS + ``seq_len`` distinct random tokens, repeated twice (positions 1..L and
    L+1..2L). Score: mean of pattern[q, q + 1 - L] over the second copy's queries q = L+1..2L (the
    diagonal at offset 1 - L, restricted to the queries where it is the induction target; ARENA's
    version also averages two first-copy entries, which this leaves out). Returns layer, head, score.

    ``transformer_lens.head_detector.detect_head(..., "induction_head")`` on the same sequence gives
    L / (2L + 1) times this (it divides by all 2L + 1 query rows)."""
    tokens = _twice_repeated(model, seq_len, n_examples, seed, bos_id, exclude_top, vocab_range, token_pool,
                             token_counts, "the induction score")
    target = _diagonal_target(tokens.shape[1], 1 - seq_len, range(seq_len + 1, 2 * seq_len + 1))
    return _frame(attention_score(model, tokens, target, seq_len, batch_size))


def duplicate_token_score(model, seq_len: int = 50, n_examples: int = 10, seed: int = 0,
                          bos_id: int | None = None, exclude_top: float = EXCLUDE_FRACTION,
                          vocab_range: tuple[int, int] | None = None, token_pool=None, token_counts=None,
                          batch_size: int = 16):
    """Duplicate-token score: on the induction score's sequences, mean attention from each token of
    the second copy to the same token in the first copy (pattern[q, q - L], q = L+1..2L).
    Returns layer, head, score."""
    tokens = _twice_repeated(model, seq_len, n_examples, seed, bos_id, exclude_top, vocab_range, token_pool,
                             token_counts, "the duplicate-token score")
    target = _diagonal_target(tokens.shape[1], -seq_len, range(seq_len + 1, 2 * seq_len + 1))
    return _frame(attention_score(model, tokens, target, seq_len, batch_size))


def previous_token_score(model, windows, batch_size: int = 16):
    """Previous-token score: mean attention from position i to i - 1 (i = 1..pos-1) over ``windows``
    (n, pos) of ordinary text (e.g. ``eval_windows``). Returns layer, head, score.

    ``detect_head(..., "previous_token_head")`` on one window gives (pos - 1) / pos times this."""
    from .metrics import _as_windows

    windows = _as_windows(windows)
    pos = windows.shape[1]
    if pos < 2:
        raise ValueError(f"windows of {pos} token have no previous token: use windows of at least 2 tokens")
    target = _diagonal_target(pos, -1, range(1, pos))
    return _frame(attention_score(model, windows, target, pos - 1, batch_size))


# ----------------------------------------------------------------------------- copying (OV circuit)

def ov_weights(model, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_V (d_model, d_head), W_O (d_head, d_model)) of one head, so that the head's output is
    pattern @ (ln_1(x) @ W_V + b_V) @ W_O (+ b_O). Supported: ``attn_only`` and GPT-2."""
    inner = unwrap(model)
    a = get_adapter(inner)
    a.check_layer(layer)
    if not 0 <= head < a.n_heads:
        raise ValueError(f"head {head} out of range: layer {layer} has heads 0-{a.n_heads - 1}")
    attn = a.module(inner, layer, "attn")
    sl = a.head_slice(head)
    if a.model_type == "attn_only":
        w_v = attn.v_proj.weight[sl].T  # nn.Linear weight (head*d_head, d_model) -> (d_model, d_head)
        w_o = attn.c_proj.weight[:, sl].T  # (d_model, head*d_head) -> (d_head, d_model)
    elif a.model_type == "gpt2":
        d = a.d_model  # Conv1D: y = x @ weight + bias; c_attn weight (d_model, 3 d_model) = [q | k | v]
        w_v = attn.c_attn.weight[:, 2 * d + sl.start: 2 * d + sl.stop]
        w_o = attn.c_proj.weight[sl]  # Conv1D (head*d_head, d_model)
    else:
        raise NotImplementedError(f"copying score: reading W_V/W_O is implemented for {', '.join(COPYING_SUPPORTED)}, "
                                  f"not {a.model_type!r}")
    return w_v.detach(), w_o.detach()


def _copying_parts(model):
    inner = unwrap(model)
    a = get_adapter(inner)
    if a.model_type not in COPYING_SUPPORTED:
        raise NotImplementedError(f"copying score is implemented for {', '.join(COPYING_SUPPORTED)} "
                                  f"(got {a.model_type!r}): it reads W_V/W_O from the weights per architecture")
    return (inner.get_input_embeddings().weight.detach(), inner.get_output_embeddings().weight.detach(),
            inner.transformer.ln_f, [inner.transformer.h[i].ln_1 for i in range(a.n_layers)])


@torch.no_grad()
def copying_score(model, n_samples: int = 200, seed: int = 0, first_ln: bool = True, final_ln: bool = True,
                  exclude_top: float = EXCLUDE_FRACTION, vocab_range: tuple[int, int] | None = None,
                  token_pool=None, token_counts=None):
    """Copying score of every head: how much of its direct OV effect raises the attended token's logit.

    For each of ``n_samples`` random tokens t (distinct, seeded; all candidates if fewer):
      x = W_E[t], passed through the head's layer's ``ln_1`` if ``first_ln`` (the token as if it
          were the whole residual stream; positions are left out);
      o = x @ W_V @ W_O (the OV circuit; biases left out: they do not depend on t);
      if ``final_ln``: o = (o - mean(o)) * ln_f.weight (the final LayerNorm's linear part: its scale is
          irrelevant because the share below is scale-invariant, its bias is not the head's);
      logits = o @ W_U^T; d = relu(logits - mean over the vocabulary);
      share(t) = d[t] / sum(d)  (0 if nothing increases).
    raw = mean share; score = clip(4 * raw - 1, -1, 1): the paper's raw ratio runs 0..0.5 and is
    rescaled to [-1, 1] (0.25 -> 0). A head that writes t's own unembedding direction scores 1; one
    that suppresses t scores -1.

    Returns a DataFrame: layer, head, score, raw."""
    w_e, w_u, ln_f, ln_1 = _copying_parts(model)
    a = get_adapter(unwrap(model))
    pool = _pool(model, 1, token_pool, exclude_top, vocab_range, token_counts, None)
    g = torch.Generator().manual_seed(seed)
    toks = pool[torch.randperm(pool.numel(), generator=g)[: min(n_samples, pool.numel())]]
    scores = torch.zeros(a.n_layers, a.n_heads, dtype=torch.float64)
    for layer in range(a.n_layers):
        x = w_e[toks]  # (n, d_model)
        if first_ln:
            x = ln_1[layer](x)
        for head in range(a.n_heads):
            w_v, w_o = ov_weights(model, layer, head)
            o = x @ w_v @ w_o  # (n, d_model)
            if final_ln:
                o = (o - o.mean(-1, keepdim=True)) * ln_f.weight
            logits = (o @ w_u.T).double()  # (n, vocab)
            d = (logits - logits.mean(-1, keepdim=True)).relu()
            total = d.sum(-1)
            own = d.gather(-1, toks[:, None].to(d.device)).squeeze(-1)
            share = torch.where(total > 0, own / total.clamp_min(1e-300), torch.zeros_like(total))
            scores[layer, head] = share.mean()
    return _frame((4 * scores - 1).clamp(-1, 1), raw=scores)


# ----------------------------------------------------------------------------- all scores

def head_scores(model, windows=None, *, n_examples: int = 10, seed: int = 0, bos_id: int | None = None,
                prefix_tokens: int = 25, n_repeats: int = 4, seq_len: int = 50,
                exclude_top: float = EXCLUDE_FRACTION, vocab_range: tuple[int, int] | None = None,
                token_pool=None, token_counts=None, batch_size: int = 16):
    """All scores of every head in one wide DataFrame: layer, head, prefix_matching, copying,
    copying_raw, induction, duplicate_token and (when ``windows`` of text are given) previous_token.
    Arguments are passed to the score functions (same seed and probe tokens for all)."""
    common = dict(bos_id=bos_id, exclude_top=exclude_top, vocab_range=vocab_range, token_pool=token_pool,
                  token_counts=token_counts)
    df = prefix_matching_score(model, prefix_tokens, n_repeats, n_examples, seed, batch_size=batch_size,
                               **common).rename(columns={"score": "prefix_matching"})
    cp = copying_score(model, seed=seed, exclude_top=exclude_top, vocab_range=vocab_range, token_pool=token_pool,
                       token_counts=token_counts)
    df["copying"], df["copying_raw"] = cp["score"].to_numpy(), cp["raw"].to_numpy()
    df["induction"] = induction_score(model, seq_len, n_examples, seed, batch_size=batch_size, **common)["score"].to_numpy()
    df["duplicate_token"] = duplicate_token_score(model, seq_len, n_examples, seed, batch_size=batch_size,
                                                  **common)["score"].to_numpy()
    if windows is not None:
        df["previous_token"] = previous_token_score(model, windows, batch_size)["score"].to_numpy()
    return df


def classify_induction_heads(df, prefix_threshold: float = PREFIX_THRESHOLD,
                             copying_threshold: float = COPYING_THRESHOLD, prefix_column: str = "prefix_matching"):
    """Mark induction heads: prefix matching >= ``prefix_threshold`` and copying >= ``copying_threshold``.

    The paper defines an induction head as one with both prefix matching and copying and gives no
    numbers. Defaults, and why:
      * prefix 0.4: uniform attention scores about 1 / n_tokens (0.04 for the paper's 25 tokens), so
        0.4 is ten times chance, and it is the common practical threshold for the induction score
        (ARENA). Use ``prefix_column="induction"`` to classify on the induction score instead.
      * copying 0.0 (rescaled): raw share 0.25, i.e. a quarter of the head's total logit increase goes
        to the attended token itself, half the paper's maximum of about 0.5. A head with unrelated
        OV output gives a share near 2 / vocab (score near -1).

    Returns a copy of ``df`` with a boolean ``is_induction`` column."""
    missing = [c for c in (prefix_column, "copying") if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks column(s) {missing}: pass the DataFrame of head_scores(model, ...)")
    out = df.copy()
    out["is_induction"] = (out[prefix_column] >= prefix_threshold) & (out["copying"] >= copying_threshold)
    return out
