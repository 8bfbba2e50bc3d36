"""The tokenizer, rebuilt from the GGUF metadata: byte-level BPE with `tokenizers` (digits split one by one), or
SentencePiece (`sentencepiece_tokenizer.py`)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .errors import ModelFileError

CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for control/special tokens


def tokenizer_from_gguf_metadata(meta: dict):
    """The tokenizer of GGUF's `tokenizer.ggml.*` fields (as `GGUFSource.tokenizer_metadata()` returns): byte-level
    BPE (`gpt2`, SmolLM2) here, SentencePiece (`llama`, Gemma 3) in `sentencepiece_tokenizer`."""
    if meta["model"] == "llama":
        from .sentencepiece_tokenizer import sentencepiece_from_gguf_metadata

        return sentencepiece_from_gguf_metadata(meta)
    if meta["model"] != "gpt2":
        raise ModelFileError(f"unsupported GGUF tokenizer model '{meta['model']}' (expected 'gpt2' byte-level BPE or "
                             f"'llama' SentencePiece)")
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
