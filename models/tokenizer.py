"""The tokenizer, rebuilt from the GGUF metadata with `tokenizers` (byte-level BPE, digits split one by one)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for control/special tokens


def tokenizer_from_gguf_metadata(meta: dict) -> Tokenizer:
    """Build a BPE tokenizer from GGUF's `tokenizer.ggml.*` fields (as `GGUFSource.tokenizer_metadata()` returns)."""
    if meta["model"] != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model '{meta['model']}' (expected byte-level BPE 'gpt2')")
    vocab = {tok: i for i, tok in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(meta["tokens"], meta["token_type"]) if ty == CONTROL_TOKEN_TYPE]
    tok.add_special_tokens(specials)
    return tok
