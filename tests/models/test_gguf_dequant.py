"""The grouped dequantizer (models/gguf_dequant.py) gives gguf.quants.dequantize's values bit for bit, for every tensor
type in both models' files, in groups that do not divide the rows (the last group shorter), transposed or not."""

import gguf
import numpy as np
import pytest

from vorch_jax.models import gguf_dequant


def _models():
    from vorch_jax.models.gemma import load_gemma3_source
    from vorch_jax.models.gguf_source import load_smollm2_source

    return {"smollm2": load_smollm2_source, "gemma3": load_gemma3_source}


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_every_tensor_type_matches_gguf_bit_for_bit(model, monkeypatch):
    src = _models()[model]()
    first_of_type = {}
    for name, t in src._tensors.items():
        first_of_type.setdefault(t.tensor_type, (name, t))
    assert len(first_of_type) >= 3, first_of_type.keys()  # F32 norms and at least two quantized types
    grouped = 0
    for qtype, (name, t) in first_of_type.items():
        data = t.data[:37] if t.data.ndim == 2 else t.data  # 37 rows: groups of 5 leave a last group of 2
        ref = np.asarray(gguf.quants.dequantize(data, qtype), np.float32)
        n_cols = ref.shape[-1]
        monkeypatch.setattr(gguf_dequant, "GROUP_VALUES", 5 * n_cols)
        for transpose in (False, True):
            got = gguf_dequant.dequantize(data, qtype, transpose=transpose)
            want = np.ascontiguousarray(ref.T) if transpose else ref
            assert got.dtype == np.float32 and got.flags.c_contiguous, (name, qtype.name)
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), (name, qtype.name, transpose)
        grouped += data.ndim == 2 and data.dtype == np.uint8
    assert grouped >= 2  # the grouped path ran, not only gguf's fallback
