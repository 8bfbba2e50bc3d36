"""`vorch ppl` against the independent float64 numpy Llama of the tests, on the same tokens.

    python -m vorch_jax.experiments.ppl_reference [--max-tokens 512]

Prints both perplexities (BOS `<|endoftext|>` prepended, the first N tokens of the KJV corpus) and their relative
difference. SmolLM2's weights were 4-bit (Q4_1) to begin with; both sides dequantize the same file.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

from vorch_jax.models.corpus import kjv_text
from vorch_jax.models.generate import sequence_nll
from vorch_jax.models.smollm2 import bos_id, load_smollm2

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "models" / "numpy_llama_reference.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args(argv)
    model, tok, source = load_smollm2()
    ids = [bos_id(tok)] + tok.encode(kjv_text(max_chars=args.max_tokens * 8)).ids[: args.max_tokens]
    nll, n = sequence_nll(model, ids)
    spec = importlib.util.spec_from_file_location("numpy_llama_reference", REFERENCE)
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    logits = ref_mod.NumpyLlama(source.path).logits(ids[:-1])
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ref_nll = -logp[np.arange(n), ids[1:]].sum()
    ppl, ref_ppl = math.exp(nll / n), math.exp(ref_nll / n)
    print(f"tokens {n}: vorch ppl {ppl:.6f} (float32), numpy float64 reference ppl {ref_ppl:.6f}, "
          f"relative difference {abs(ppl - ref_ppl) / ref_ppl:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
