"""Our model family and its tooling: the attention-only model, smeared keys, corpus, tokenizer, trainer."""
