"""Per-head scores: prefix matching, copying, induction, duplicate-token and previous-token.

Each score function returns a tidy DataFrame with one row per (layer, head): columns ``layer``,
``head``, ``score`` (``copying_score`` adds ``raw``). ``head_scores`` joins them into one wide table
and ``classify_induction_heads`` marks induction heads on it.

Attention scores are read from the attention patterns of the toolkit's own traces
(pattern sites read inside ``observable(model)``), so they work for every
architecture ``interventions.engine.adapters`` supports. The copying score is measured by a forward pass with
frozen diagonal patterns (``copying_score``), so it too works on every architecture.

Probe tokens and BOS are inferred from the model and its tokenizer by default (``inferred_pool``,
``find_tokenizer``): printable, non-special ids the model predicts (so it has seen them), without the
most common ones; the tokenizer's BOS. Pass ``bos_id`` / ``token_pool`` / ``vocab_range`` to override.
The probes are unpadded sequences of one length, and so must be the ``windows`` / ``tokens`` given to
``previous_token_score``, ``attention_score`` and ``head_scores``: no attention mask is taken.

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

import weakref
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..engine.adapters import get_adapter, module_at, observable
from ..engine.devices import module_device
from ..engine.sites import Site
from ..engine.tracing import Engine, Run, Write, check_positive, unwrap

ScoreName = Literal["prefix_matching", "copying", "induction", "duplicate_token", "previous_token"]

# Default thresholds of ``classify_induction_heads`` (the paper gives none; reasons in its docstring).
PREFIX_THRESHOLD = 0.4
COPYING_THRESHOLD = 0.0
# Fraction of the vocabulary left out at each end when drawing probe tokens (the paper excludes the
# most and least common tokens; 10% at each end keeps 80% of ids as candidates).
EXCLUDE_FRACTION = 0.1


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
    elif vocab_range is None and token_counts is None:
        pool = inferred_pool(model, exclude_top, bos_id)
    else:
        pool = probe_token_pool(a.vocab_size, exclude_top=exclude_top, vocab_range=vocab_range,
                                token_counts=token_counts, exclude_ids=() if bos_id is None else (bos_id,))
    if pool.numel() < n_needed:
        raise ValueError(f"the vocabulary is too small to draw {n_needed} distinct random tokens: only "
                         f"{pool.numel()} candidate ids (vocab_size={a.vocab_size}, exclude_top={exclude_top}, "
                         f"vocab_range={vocab_range}). Use fewer tokens (n_tokens / seq_len <= {pool.numel()}), "
                         "a smaller exclude_top, a wider vocab_range, or pass token_pool")
    return pool


# ----------------------------------------------------------------------------- probes inferred from the model

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def find_tokenizer(model):
    """The tokenizer saved beside ``model``'s weights, if any: in the folder it was loaded from, or in a
    ``tokenizer`` folder there or up to two levels above (a run folder keeps ``tokenizer/`` beside
    ``checkpoints/``). Local folders only (no hub look-up); None when there is none."""
    inner = unwrap(model)
    if inner in _TOKENIZERS:
        return _TOKENIZERS[inner]
    found = None
    name = getattr(getattr(inner, "config", None), "_name_or_path", "") or getattr(inner, "name_or_path", "")
    if name and Path(name).is_dir():
        for folder in tokenizer_folders(name):
            from transformers import AutoTokenizer

            try:
                found = AutoTokenizer.from_pretrained(str(folder))
                break
            except (OSError, ValueError):
                continue
    _TOKENIZERS[inner] = found
    return found


def tokenizer_folders(model_folder: str | Path) -> list[Path]:
    """The folders ``find_tokenizer`` tries, in order, for a model loaded from ``model_folder`` (resolved):
    of the folder, its ``tokenizer`` subfolder and the same one and two levels up, those holding a
    ``tokenizer.json`` or ``tokenizer_config.json``."""
    base = Path(model_folder).resolve()
    candidates = (base, base / "tokenizer", base.parent, base.parent / "tokenizer", base.parent.parent,
                  base.parent.parent / "tokenizer")
    return [f for f in candidates if (f / "tokenizer.json").is_file() or (f / "tokenizer_config.json").is_file()]


def printable_ids(tokenizer) -> torch.Tensor:
    """Ids (not special tokens) that decode to printable, non-blank text (no replacement character).

    Special: the tokenizer's named special ids and every added token marked special (Llama 3's
    ``<|reserved_special_token_*|>``, chat markers), which ``all_special_ids`` leaves out."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    keep = [i for i, t in enumerate(texts)
            if i not in special and t.strip() and t.isprintable() and "\ufffd" not in t]
    return torch.tensor(keep, dtype=torch.long)


@torch.no_grad()
def predicted_frequencies(model, candidates: torch.Tensor, bos_id: int | None, seed: int = 0) -> torch.Tensor:
    """(vocab,) the model's mean next-token probability over BOS + random candidate tokens: an estimate
    of each token's frequency in its training data (tokens it never saw get almost none)."""
    a = get_adapter(unwrap(model))
    g = torch.Generator().manual_seed(seed)
    n = min(64, (a.n_ctx or 65) - 1)
    rows = candidates[torch.randint(0, candidates.numel(), (4, n), generator=g)]
    if bos_id is not None:
        rows = torch.cat([torch.full((4, 1), bos_id, dtype=torch.long), rows], dim=1)
    logits = Engine(model).run(Run(rows)).logits
    return logits.float().softmax(-1).mean((0, 1)).cpu()


def inferred_pool(model, exclude_top: float = EXCLUDE_FRACTION, bos_id: int | None = None) -> torch.Tensor:
    """Probe tokens inferred from the model (and its tokenizer, when ``find_tokenizer`` finds one).

    Candidates: the tokenizer's printable, non-special ids, else every id; BOS removed. The model's own
    predicted frequencies then stand in for the corpus counts the paper uses: ids it predicts with
    under a tenth of the candidates' uniform probability (tokens absent from its training data, such as
    unused bytes) are dropped, and so is the ``exclude_top`` fraction of the most predicted ones (the
    most common tokens). Why: probing a head with tokens whose embeddings never trained measures noise
    (a trained attn-2l's induction head scored copying -0.78 on ids 26-230 of its byte vocabulary)."""
    if not 0 <= exclude_top < 1:
        raise ValueError(f"exclude_top={exclude_top} must be a fraction in [0, 1) of the most predicted ids left out")
    a = get_adapter(unwrap(model))
    tok = find_tokenizer(model)
    ids = printable_ids(tok) if tok is not None else torch.arange(a.vocab_size)
    ids = ids[ids < a.vocab_size]
    if bos_id is not None:
        ids = ids[ids != bos_id]
    if ids.numel() < 2:
        return ids
    p = predicted_frequencies(model, ids, bos_id)[ids]
    ids, p = ids[p >= 0.1 / ids.numel()], p[p >= 0.1 / ids.numel()]
    order = torch.argsort(p, descending=True, stable=True)
    return ids[order[int(round(exclude_top * ids.numel())):]].sort().values


def bos_hint(where: str, tok, vocab_size: int) -> str:
    """The fix for an inferred BOS id outside the vocabulary, by where it came from."""
    from ..zoo.tokenizer import N_BYTES

    if where.startswith("tokenizer"):
        return (f"the tokenizer found beside the model ({getattr(tok, 'name_or_path', '?')}) does not fit it: pass "
                "bos_id=ID, the BOS id of the tokenizer the model was trained with")
    if vocab_size == N_BYTES + 1:  # our byte-level vocabulary: 256 bytes + the separator
        return "its vocabulary of 257 is byte-level: pass bos_id=256 (the separator of byte_tokenizer())"
    return (f"pass bos_id=ID, the BOS id of the model's own tokenizer (tokenizer.bos_token_id, in [0, {vocab_size})), "
            "or set model.config.bos_token_id to it")


def _bos(model, bos_id: int | None) -> int:
    """``bos_id``, else the tokenizer's BOS/EOS (``find_tokenizer``), else the config's BOS/EOS id, else 0."""
    inner = unwrap(model)
    a = get_adapter(inner)
    if bos_id is None:
        tok = find_tokenizer(model)
        c = inner.config
        where = None
        for where, v in (("tokenizer.bos_token_id", getattr(tok, "bos_token_id", None)),
                         ("tokenizer.eos_token_id", getattr(tok, "eos_token_id", None)),
                         ("config.bos_token_id", getattr(c, "bos_token_id", None)),
                         ("config.eos_token_id", getattr(c, "eos_token_id", None))):
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                bos_id = int(v)
                break
        else:
            bos_id = 0
        if not 0 <= bos_id < a.vocab_size:
            raise ValueError(f"the BOS id {bos_id} (the model's {where}) is outside the vocabulary "
                             f"[0, {a.vocab_size}): {bos_hint(where, tok, a.vocab_size)}")
    if not 0 <= int(bos_id) < a.vocab_size:
        raise ValueError(f"bos_id={bos_id} is outside the vocabulary [0, {a.vocab_size})")
    return int(bos_id)


def repeated_random_tokens(pool: torch.Tensor, n_tokens: int, n_repeats: int, n_examples: int,
                           bos_id: int | None, seed: int = 0, distinct: bool = True) -> torch.Tensor:
    """(n_examples, 1 + n_tokens * n_repeats): BOS, then ``n_tokens`` ids drawn (seeded) from ``pool``,
    repeated ``n_repeats`` times. Same seed, same tokens. The library's one generator of such probes.

    ``distinct``: ids differ within a row (head scores: a repeated id would make a second match);
    False draws with replacement (the trainer's repeated-token loss). ``bos_id=None``: no BOS column.

    >>> repeated_random_tokens(torch.arange(10, 20), 3, 2, 1, bos_id=0, seed=0).shape
    torch.Size([1, 7])
    """
    n_tokens = check_positive(n_tokens, "n_tokens")  # numpy integers pass, bools do not
    n_repeats = check_positive(n_repeats, "n_repeats", minimum=2)
    n_examples = check_positive(n_examples, "n_examples")
    if distinct and pool.numel() < n_tokens:
        raise ValueError(f"cannot draw {n_tokens} distinct tokens from a pool of {pool.numel()}: "
                         "use fewer tokens or a larger pool")
    g = torch.Generator().manual_seed(seed)
    if distinct:
        seg = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:n_tokens]] for _ in range(n_examples)])
    else:
        seg = pool[torch.randint(0, pool.numel(), (n_examples, n_tokens), generator=g)]  # (n_examples, n_tokens)
    seg = seg.repeat(1, n_repeats)
    if bos_id is None:
        return seg
    return torch.cat([torch.full((n_examples, 1), bos_id, dtype=torch.long), seg], dim=1)


def _check_probe_length(value, name: str) -> int:
    """Repeated sequences need >= 3 distinct tokens for the induction target (offset 1 - L) to differ
    from attending to the token itself (L = 1) or to the previous token (L = 2)."""
    return check_positive(value, name, minimum=3, why="with 1 or 2 repeated tokens the token after an earlier "
                          "occurrence is the query itself or the previous token, so the score would measure self- "
                          "or previous-token attention")


def _check_length(model, length: int, what: str) -> None:
    n_ctx = get_adapter(unwrap(model)).n_ctx
    if n_ctx is not None and length > n_ctx:
        raise ValueError(f"{what} needs {length} positions but the model's context is {n_ctx}: "
                         "use fewer tokens / repeats, e.g. head_scores(model, prefix_tokens=..., n_repeats=..., "
                         "seq_len=...) (classify_induction_heads takes that table instead of the model)")


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
    batch_size = check_positive(batch_size, "batch_size")
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
    n_tokens = _check_probe_length(n_tokens, "n_tokens")
    tokens = probe_sequences(model, n_tokens, n_examples, seed, n_repeats, bos_id, exclude_top, vocab_range,
                             token_pool, token_counts)
    target = induction_targets(tokens)
    target[:, : 1 + n_tokens] = 0  # score queries of repeats 2.. only
    return _frame(attention_score(model, tokens, target, n_tokens * (n_repeats - 1), batch_size))


def probe_sequences(model, seq_len: int, n_examples: int, seed: int = 0, n_repeats: int = 2,
                    bos_id: int | None = None, exclude_top: float = EXCLUDE_FRACTION,
                    vocab_range: tuple[int, int] | None = None, token_pool=None, token_counts=None) -> torch.Tensor:
    """The scores' probe sequences for ``model``: (n_examples, 1 + seq_len * n_repeats), BOS then
    ``seq_len`` distinct random probe tokens repeated ``n_repeats`` times (``repeated_random_tokens``),
    with BOS and the probe tokens inferred from the model unless given (module docstring).

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=60)).eval()
        >>> t = probe_sequences(model, 5, 2, bos_id=0, vocab_range=(1, 60))
        >>> t.shape, bool((t[:, 1:6] == t[:, 6:]).all())
        (torch.Size([2, 11]), True)
    """
    bos = _bos(model, bos_id)
    pool = _pool(model, seq_len, token_pool, exclude_top, vocab_range, token_counts, bos)
    tokens = repeated_random_tokens(pool, seq_len, n_repeats, n_examples, bos, seed)
    _check_length(model, tokens.shape[1], f"the probe sequences ({n_repeats} x seq_len={seq_len} + BOS)")
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
    seq_len = _check_probe_length(seq_len, "seq_len")
    tokens = probe_sequences(model, seq_len, n_examples, seed, 2, bos_id, exclude_top, vocab_range, token_pool,
                             token_counts)
    target = _diagonal_target(tokens.shape[1], 1 - seq_len, range(seq_len + 1, 2 * seq_len + 1))
    return _frame(attention_score(model, tokens, target, seq_len, batch_size))


def duplicate_token_score(model, seq_len: int = 50, n_examples: int = 10, seed: int = 0,
                          bos_id: int | None = None, exclude_top: float = EXCLUDE_FRACTION,
                          vocab_range: tuple[int, int] | None = None, token_pool=None, token_counts=None,
                          batch_size: int = 16):
    """Duplicate-token score: on the induction score's sequences, mean attention from each token of
    the second copy to the same token in the first copy (pattern[q, q - L], q = L+1..2L).
    Returns layer, head, score."""
    seq_len = _check_probe_length(seq_len, "seq_len")
    tokens = probe_sequences(model, seq_len, n_examples, seed, 2, bos_id, exclude_top, vocab_range, token_pool,
                             token_counts)
    target = _diagonal_target(tokens.shape[1], -seq_len, range(seq_len + 1, 2 * seq_len + 1))
    return _frame(attention_score(model, tokens, target, seq_len, batch_size))


def previous_token_score(model, windows, batch_size: int = 16):
    """Previous-token score: mean attention from position i to i - 1 (i = 1..pos-1) over ``windows``
    (n, pos) of ordinary text (e.g. ``eval_windows``; unpadded, no mask is taken). Returns layer, head, score.

    ``detect_head(..., "previous_token_head")`` on one window gives (pos - 1) / pos times this."""
    from .metrics import as_windows

    windows = as_windows(windows)
    pos = windows.shape[1]
    if pos < 2:
        raise ValueError(f"windows of {pos} token have no previous token: use windows of at least 2 tokens")
    target = _diagonal_target(pos, -1, range(1, pos))
    return _frame(attention_score(model, windows, target, pos - 1, batch_size))


# ----------------------------------------------------------------------------- copying (OV circuit)

_NO_COPYING = ("the attention scores need no final norm: prefix_matching_score, induction_score, "
               "duplicate_token_score and previous_token_score (interventions.analysis.scores)")

def frozen_final_norm(inner, adapter, resid: torch.Tensor):
    """The final norm as a linear map with its scale frozen at ``resid`` (batch, pos, d_model):
    LayerNorm: x -> w * (x - mean x) / sigma(resid); RMSNorm: x -> w * x / rms(resid)."""
    path = adapter.spec.final_norm
    if path is None:
        raise ValueError(f"the {adapter.model_type} adapter names no final norm, which the copying score (and so "
                         "head_scores) freezes: register it with ArchSpec(final_norm=<path of the norm before the "
                         f"unembedding>); {_NO_COPYING}")
    norm = module_at(inner, path)
    resid = resid.to(module_device(inner, path))  # everything on the norm's device (multi-device models)
    w = getattr(norm, "weight", None)
    w = torch.ones(resid.shape[-1], device=resid.device) if w is None else w.detach()
    eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5)
    if isinstance(norm, torch.nn.LayerNorm):
        scale = (resid.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        frozen = lambda x: w * (x.to(w.device) - x.to(w.device).mean(-1, keepdim=True)) / scale  # noqa: E731
    elif "rms" in type(norm).__name__.lower():
        scale = (resid.float().pow(2).mean(-1, keepdim=True) + eps).sqrt().to(resid.dtype)
        frozen = lambda x: w * x.to(w.device) / scale  # noqa: E731
    else:
        raise ValueError(f"final norm {type(norm).__name__} at {path!r} is neither a LayerNorm nor an RMSNorm: "
                         f"the copying score (and so head_scores) cannot freeze its scale; {_NO_COPYING}")
    # at ``resid`` itself the frozen map plus the norm's bias is the norm: a norm of another formula (Gemma's
    # RMSNorm scales by 1 + weight) would otherwise give every head a wrong score silently
    want = norm(resid).float()
    bias = getattr(norm, "bias", None)
    got = frozen(resid).float() + (0 if bias is None else bias.detach().float())
    tol = 1e-4 if resid.dtype == torch.float32 else 3e-2
    if float((got - want).abs().max()) > tol * max(1.0, float(want.abs().max())):
        raise ValueError(f"final norm {type(norm).__name__} at {path!r} is not w * x / rms(x) (RMSNorm) or "
                         "w * (x - mean) / std + b (LayerNorm) with w its weight: the copying score (and so "
                         "head_scores) cannot freeze its scale (no ArchSpec(final_norm=...) changes that); "
                         f"{_NO_COPYING}")
    return frozen


@torch.no_grad()
def copying_score(model, n_samples: int = 200, seed: int = 0, bos_id: int | None = None,
                  exclude_top: float = EXCLUDE_FRACTION, vocab_range: tuple[int, int] | None = None,
                  token_pool=None, token_counts=None):
    """Copying score of every head, by a forward pass: how much of a head's direct effect on the
    logits, when it attends to a token, raises that token's own logit.

    For ``n_samples`` distinct probe tokens t (after a BOS), on every architecture:
      1. run with every attention pattern frozen to the diagonal (each position attends only to
         itself), so head h's output at t's position is its OV circuit applied to t's own residual
         stream (norms, biases and earlier layers as the model computes them);
      2. the head's direct effect on the logits: its output o_h (its ``z`` through the output
         projection, bias left out) through the final norm with its scale frozen at the run's value
         (as direct logit attribution does: a norm's rescaling is not the head's) and the unembedding:
         d = W_U norm_frozen(o_h), over the probe vocabulary;
      3. the probes' rows d_t (mean over the probe vocabulary subtracted) form the head's OV circuit
         as a square matrix over the probe tokens; score = sum of its eigenvalues / sum of their
         absolute values (Elhage et al. 2021, the copying measure Olsson et al. use): 1 for a head that
         maps every token to itself, -1 for one that suppresses it, near 0 for an unrelated map; a
         head that writes nothing scores -1 (it copies nothing).
    ``raw``: the share relu(d_t - mean)[t] / sum relu(d_t - mean), averaged over probes. It is kept for
    reference but not used to classify: over a vocabulary of many tokens it is diluted by every token
    the head raises a little (the trained attn-2l's induction head maps most printable bytes to
    themselves as the top logit yet has a share under 0.25), while the eigenvalue score is not.

    Probe tokens: ``inferred_pool`` by default, because logits of tokens the model never trained on
    say nothing about copying.

    Returns a DataFrame: layer, head, score, raw."""
    engine = Engine(model)
    a = engine.adapter
    bos = _bos(model, bos_id)
    pool = _pool(model, 2, token_pool, exclude_top, vocab_range, token_counts, bos)
    g = torch.Generator().manual_seed(seed)
    toks = pool[torch.randperm(pool.numel(), generator=g)[: min(n_samples, pool.numel())]]
    width = min(toks.numel(), (a.n_ctx or toks.numel() + 1) - 1)
    chunks = [toks[i:i + width] for i in range(0, toks.numel(), width)]
    rows = torch.stack([torch.cat([torch.tensor([bos]), torch.cat([c, c[:1].expand(width - c.numel())])])
                        for c in chunks])  # (n_rows, 1 + width); a short last row is padded with a probe
    valid = torch.zeros(rows.shape, dtype=torch.bool)
    for i, c in enumerate(chunks):
        valid[i, 1:1 + c.numel()] = True
    b, p = rows.shape
    last = a.n_layers - 1
    diag = torch.eye(p).expand(b, a.n_heads, p, p)
    reads = [Site(layer, "z") for layer in range(a.n_layers)] + [Site(last, "resid_post")]
    with observable(engine.inner):
        out = engine.run(Run(rows, reads=reads, writes=[Write(Site(layer, "pattern"), diag)
                                                        for layer in range(a.n_layers)]))
    acts = out.acts
    col = torch.full((a.vocab_size,), -1, dtype=torch.long)
    col[pool] = torch.arange(pool.numel())
    own = col[rows]  # (b, p): each token's column among the probe logits
    resid = acts[f"L{last}.resid_post"]  # (b, p, d_model): the final norm's input
    norm = frozen_final_norm(engine.inner, a, resid)
    u_path = a.unembed_path(engine.inner)
    unembed = module_at(engine.inner, u_path)
    # the logit arithmetic on the unembedding's device; each module called on its own (multi-device models)
    u_dev = engine.device(u_path)
    pool_u, own, valid, probe_cols = pool.to(u_dev), own.to(u_dev), valid.to(u_dev), col[toks].to(u_dev)
    scores = torch.zeros(a.n_layers, a.n_heads, dtype=torch.float64)
    raws = torch.zeros_like(scores)
    for layer in range(a.n_layers):
        z = acts[f"L{layer}.z"].to(engine.device(a.path(layer, "o_proj")))  # (b, p, head, d_head)
        o_proj = a.module(engine.inner, layer, "o_proj")
        bias = o_proj(torch.zeros_like(z).flatten(2))  # (b, p, d_model): the output bias alone
        for head in range(a.n_heads):
            only = torch.zeros_like(z)
            only[:, :, head] = z[:, :, head]
            o = o_proj(only.flatten(2)) - bias  # the head's direct write (b, p, d_model)
            written = norm(o).to(u_dev)
            d = (unembed(written) - unembed(torch.zeros_like(written)))[..., pool_u].double()  # (b, p, n_pool)
            d = d - d.mean(-1, keepdim=True)
            rel = d.relu()
            total = rel.sum(-1)
            mine = rel.gather(-1, own.clamp(min=0)[..., None]).squeeze(-1)
            share = torch.where(total > 0, mine / total.clamp_min(1e-300), torch.zeros_like(total))  # (b, p)
            raws[layer, head] = float(share[valid].mean())
            circuit = d[valid][:, probe_cols]  # (n, n): probe token attended -> logit change of each probe token
            circuit = circuit - circuit.mean(-1, keepdim=True)
            ev = torch.linalg.eigvals(circuit)
            mass = float(ev.abs().sum())
            scores[layer, head] = (float(ev.real.sum()) / mass if mass > 1e-12 * max(1.0, float(circuit.abs().max()))
                                   else -1.0)
    return _frame(scores.clamp(-1, 1), raw=raws)


# ----------------------------------------------------------------------------- all scores

def _check_scores_fit(model, prefix_tokens: int, n_repeats: int, seq_len: int) -> None:
    """Refuse, before any forward pass, probe sequences longer than the model's context, naming
    ``head_scores``' own arguments and values that fit (the score functions' checks name theirs)."""
    n_ctx = get_adapter(unwrap(model)).n_ctx
    needs = {f"prefix matching: BOS + prefix_tokens={prefix_tokens} x n_repeats={n_repeats}": 1 + prefix_tokens * n_repeats,
             f"induction and duplicate-token: BOS + 2 x seq_len={seq_len}": 1 + 2 * seq_len}
    over = [f"{what} = {need}" for what, need in needs.items() if n_ctx is not None and need > n_ctx]
    if over:
        raise ValueError(f"the model's context is {n_ctx} positions, fewer than head_scores' probe sequences need "
                         f"({'; '.join(over)}): pass e.g. head_scores(model, prefix_tokens="
                         f"{min(prefix_tokens, (n_ctx - 1) // n_repeats)}, n_repeats={n_repeats}, "
                         f"seq_len={min(seq_len, (n_ctx - 1) // 2)}) (classify_induction_heads takes that table "
                         "instead of the model)")


def head_scores(model, windows=None, *, n_examples: int = 10, seed: int = 0, bos_id: int | None = None,
                prefix_tokens: int = 25, n_repeats: int = 4, seq_len: int = 50,
                exclude_top: float = EXCLUDE_FRACTION, vocab_range: tuple[int, int] | None = None,
                token_pool=None, token_counts=None, batch_size: int = 16):
    """All scores of every head in one wide DataFrame: layer, head, prefix_matching, copying,
    copying_raw, induction, duplicate_token and (when ``windows`` of text are given) previous_token.
    Arguments are passed to the score functions (same seed and probe tokens for all). The probes need
    ``1 + prefix_tokens * n_repeats`` and ``1 + 2 * seq_len`` positions (101 by default): for a shorter
    context pass smaller ones (checked before any forward pass, the error suggests values that fit).

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=60)).eval()
        >>> head_scores(model).columns.tolist()  # one row per head
        ['layer', 'head', 'prefix_matching', 'copying', 'copying_raw', 'induction', 'duplicate_token']
    """
    prefix_tokens = _check_probe_length(prefix_tokens, "prefix_tokens")
    seq_len = _check_probe_length(seq_len, "seq_len")
    n_repeats = check_positive(n_repeats, "n_repeats")
    _check_scores_fit(model, prefix_tokens, n_repeats, seq_len)
    common = dict(bos_id=bos_id, exclude_top=exclude_top, vocab_range=vocab_range, token_pool=token_pool,
                  token_counts=token_counts)
    df = prefix_matching_score(model, prefix_tokens, n_repeats, n_examples, seed, batch_size=batch_size,
                               **common).rename(columns={"score": "prefix_matching"})
    cp = copying_score(model, seed=seed, **common)
    df["copying"], df["copying_raw"] = cp["score"].to_numpy(), cp["raw"].to_numpy()
    df["induction"] = induction_score(model, seq_len, n_examples, seed, batch_size=batch_size, **common)["score"].to_numpy()
    df["duplicate_token"] = duplicate_token_score(model, seq_len, n_examples, seed, batch_size=batch_size,
                                                  **common)["score"].to_numpy()
    if windows is not None:
        df["previous_token"] = previous_token_score(model, windows, batch_size)["score"].to_numpy()
    return df


def classify_induction_heads(df, prefix_threshold: float = PREFIX_THRESHOLD,
                             copying_threshold: float = COPYING_THRESHOLD, prefix_column: str = "prefix_matching"):
    """The one induction-head rule: prefix matching >= ``prefix_threshold`` and copying >= ``copying_threshold``.

    ``df``: a table of ``head_scores``, or a model (its ``head_scores`` with default, inferred probes
    are computed first). The paper defines an induction head as one with both prefix matching and
    copying and gives no numbers. Defaults, and why:
      * prefix 0.4: uniform attention scores about 1 / n_tokens (0.04 for the paper's 25 tokens), so
        0.4 is ten times chance, and it is the common practical threshold for the induction score
        (ARENA). Use ``prefix_column="induction"`` to classify on the induction score instead.
      * copying 0.0: the OV circuit's eigenvalues are positive on balance (an unrelated map scores
        near 0, a copying head near 1; the main job's attn-2l induction head L1H3 scores 0.997).

    Returns a copy of the table with a boolean ``is_induction`` column.

    Example:
        >>> from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
        >>> model = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=60)).eval()
        >>> classify_induction_heads(model).columns[-1], int(classify_induction_heads(model).is_induction.sum())
        ('is_induction', 0)
    """
    import pandas as pd

    for name, v in (("prefix_threshold", prefix_threshold), ("copying_threshold", copying_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise ValueError(f"{name}={v!r} must be a finite number")
    if not isinstance(df, pd.DataFrame):
        df = head_scores(df)
    missing = [c for c in (prefix_column, "copying") if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks column(s) {missing}: pass the DataFrame of head_scores(model, ...)")
    out = df.copy()
    out["is_induction"] = (out[prefix_column] >= prefix_threshold) & (out["copying"] >= copying_threshold)
    return out
