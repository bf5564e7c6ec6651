"""Byte-level BPE tokenizers trained with ``tokenizers``, saved as ``PreTrainedTokenizerFast``.

``vocab_size=257`` gives pure bytes (256 byte tokens + the separator); larger sizes add BPE merges.
The separator ``<|endoftext|>`` joins documents and serves as BOS/EOS.

Example:
    >>> tok = train_tokenizer(["hello world"], vocab_size=257)
    >>> len(tok), tok("hi")["input_ids"]
    (257, [104, 105])
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..engine.tracing import check_positive

SEP = "<|endoftext|>"
N_BYTES = 256


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SEP, eos_token=SEP, pad_token=SEP,
                                   unk_token=None, padding_side="left")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Pure byte-level tokenizer: id b is byte b (0-255), id 256 is the separator."""
    vocab = {ch: i for i, ch in enumerate(_gpt2_bytes_to_unicode())}
    vocab[SEP] = N_BYTES
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([SEP])
    return _wrap(tok)


def _gpt2_bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-character table, as a list indexed by byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(N_BYTES):
        if b not in bs:
            bs.append(b)
            cs.append(N_BYTES + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    return [table[b] for b in range(N_BYTES)]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 257) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``vocab_size`` tokens (>= 257: the 256 bytes plus the separator)."""
    vocab_size = check_positive(vocab_size, "vocab_size", minimum=N_BYTES + 1,
                                why="a byte-level tokenizer needs the byte alphabet (256) + the separator")
    if vocab_size == N_BYTES + 1:
        return byte_tokenizer()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEP], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Any HF tokenizer (a saved folder, or a hub name when online)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
