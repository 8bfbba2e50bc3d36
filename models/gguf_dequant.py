"""Dequantize a GGUF tensor to float32, laid out as the model reads it, with the `gguf` package's own block code.

`gguf.quants.dequantize` runs a type's `dequantize_blocks` over groups of 16 rows and concatenates them: thousands of
small numpy calls a tensor, and the transpose to `[in, out]` is then one more strided copy of the whole tensor. Here
the same `dequantize_blocks` runs over groups of about `GROUP_VALUES` values, each written straight to its place in
the output, transposed where asked. Its arithmetic is elementwise per block, so the values are bit for bit
`gguf.quants.dequantize`'s (checked once over every tensor of both models' files; tests/models/test_gguf_dequant.py
checks each tensor type in uneven groups); only the grouping differs. A type without block code here (F32, F16, or one this gguf version names differently) takes gguf's path.
"""

from __future__ import annotations

import numpy as np

GROUP_VALUES = 1 << 18  # values dequantized at a time: 1 MiB of float32, inside a core's cache


def dequantize(data: np.ndarray, qtype, *, transpose: bool = False) -> np.ndarray:
    """float32 `[rows, cols]` of a tensor whose bytes are `data` (`[rows, row bytes]`, as the gguf reader gives a
    quantized tensor), or its transpose `[cols, rows]`, C-contiguous, when `transpose`."""
    import gguf

    quant = getattr(gguf.quants, qtype.name, None)
    if data.ndim != 2 or data.dtype != np.uint8 or not hasattr(quant, "dequantize_blocks"):
        w = np.asarray(gguf.quants.dequantize(data, qtype), np.float32)
        return np.ascontiguousarray(w.T) if transpose else w
    if hasattr(quant, "init_grid"):
        quant.init_grid()
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_rows, row_bytes = data.shape
    n_cols = row_bytes // type_size * block_size
    out = np.empty((n_cols, n_rows) if transpose else (n_rows, n_cols), np.float32)
    step = max(1, GROUP_VALUES // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        rows = np.ascontiguousarray(data[r0:r0 + step])
        w = quant.dequantize_blocks(rows.reshape(-1, type_size)).reshape(rows.shape[0], n_cols)
        if transpose:
            out[:, r0:r0 + rows.shape[0]] = w.T
        else:
            out[r0:r0 + rows.shape[0]] = w
    return out
