"""SmolLM2 as a mixture of experts by MoEfication: each layer's SwiGLU MLP split into E experts of F/E neurons.

The experts are *slices of one dense MLP*: expert e of layer i keeps the neurons `partition.neurons[i, e]`, i.e.
columns of `w_gate`/`w_up` [D, F] and rows of `w_down` [F, D]. Because SwiGLU acts neuron by neuron,

    mlp(h) = Σ_{e < E} expert_e(h)      (exactly, up to float32 summation order)

so outputs are **not** weighted by router probabilities: with top_k = E the MoE model is the dense model (a
distilled one, `moe_distill`, is the dense model plus its low-rank MLP corrections). A router
(one linear map [D, E] per layer, trained in `moe_build`) picks, per token, the top_k experts to compute; the rest
contribute nothing and need not be on device.

A shared-expert variant (DeepSeek-MoE, Qwen-MoE) sets `Fs` of each layer's neurons apart, `partition.shared_LxFs`:
every token computes them, and the E routed experts are made from the other F - Fs. They live in the layer's gate
block (the part of the layer every token reads), so `mlp(h) = shared(h) + Σ_e expert_e(h)` still holds exactly.

Blocks (the tiers' units), per layer i:
  * `layers.{i}.moe_gate` (kind `norm`): leaves `ffn_norm [D]`, `router_w [D, E]`, `router_b [E]`. Kind `norm`
    because, like the final norm, it is tiny (D·(E+1)+E floats, 21 KiB at E=8) and needed by every token of every
    step; kind `mlp` would count it with the dense FFNs it replaces. With a shared part it also holds
    `shared_w_gate [D, Fs]`, `shared_w_up [D, Fs]`, `shared_w_down [Fs, D]` and is of kind `mlp`: a dense FFN
    every token runs (`gate_kind`).
  * `layers.{i}.expert.{e}` (kind `expert`): leaves `w_gate [D, Fe]`, `w_up [D, Fe]`, `w_down [Fe, D]`, Fe = F/E.

Shapes: B batch, T tokens, D model width, F dense MLP width, E experts, Fe = F/E neurons per expert, L layers.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

from . import llama_layers as Lay
from .errors import MoEError
from .gguf_source import LlamaConfig
from .weights import matmul
from .block_ids import expert_block_id, layer_block_id, parse_block_id

GATE_LEAVES = ("ffn_norm", "router_w", "router_b")
SHARED_LEAVES = ("shared_w_gate", "shared_w_up", "shared_w_down")  # in the gate block, where a shared part exists
EXPERT_LEAVES = ("w_gate", "w_up", "w_down")


# ------------------------------------------------------------------------------------------ partition and routers


@dataclasses.dataclass(frozen=True)
class ExpertPartition:
    """Which dense neurons each expert keeps.

    Invariant (checked by `check`): `neurons_LxExFe[i]` (and `shared_LxFs[i]`, where a shared part exists) together
    are a permutation of range(F), each row sorted ascending: every neuron of every layer belongs to exactly one
    expert or to the shared part, and every routed expert has Fe = (F - Fs) / E.
    """

    neurons_LxExFe: np.ndarray  # int32
    shared_LxFs: np.ndarray | None = None  # int32; None: no shared part

    @property
    def n_layers(self) -> int:
        return self.neurons_LxExFe.shape[0]

    @property
    def n_experts(self) -> int:
        return self.neurons_LxExFe.shape[1]

    @property
    def n_shared(self) -> int:
        """Fs: neurons per layer every token computes (0: no shared part)."""
        return 0 if self.shared_LxFs is None else self.shared_LxFs.shape[1]

    @property
    def d_ff(self) -> int:
        return self.neurons_LxExFe.shape[1] * self.neurons_LxExFe.shape[2] + self.n_shared

    def check(self, n_layers: int, d_ff: int) -> "ExpertPartition":
        n, fs = self.neurons_LxExFe, self.n_shared
        if n.ndim != 3 or n.shape[0] != n_layers or n.shape[1] * n.shape[2] + fs != d_ff or (
                self.shared_LxFs is not None and self.shared_LxFs.shape[0] != n_layers):
            raise MoEError(f"partition of shape {n.shape} (shared {fs}) does not fit a model of {n_layers} layers × "
                           f"{d_ff} neurons")
        for i in range(n_layers):
            every = n[i].reshape(-1) if not fs else np.concatenate([n[i].reshape(-1), self.shared_LxFs[i]])
            if not np.array_equal(np.sort(every), np.arange(d_ff)):
                raise MoEError(f"partition of layer {i} does not cover each of its {d_ff} neurons exactly once")
        return self


@dataclasses.dataclass(frozen=True)
class Routers:
    """One linear router per layer: logits_e = h @ w_LxDxE[i] + b_LxE[i], on the normed hidden state h."""

    w_LxDxE: np.ndarray  # float32
    b_LxE: np.ndarray  # float32

    def check(self, n_layers: int, d_model: int, n_experts: int) -> "Routers":
        want = ((n_layers, d_model, n_experts), (n_layers, n_experts))
        if (self.w_LxDxE.shape, self.b_LxE.shape) != want:
            raise MoEError(f"routers of shapes {self.w_LxDxE.shape}, {self.b_LxE.shape} do not fit {want}")
        return self


# --------------------------------------------------------------------------------------------------- block ids


def gate_block_id(layer: int) -> str:
    return layer_block_id(layer, "moe_gate")


def moe_block_ids(n_layers: int, n_experts: int) -> list[str]:
    """Execution order: embed, then per layer attn, moe_gate, expert.0..E-1, then final_norm."""
    ids = ["embed"]
    for i in range(n_layers):
        ids += [layer_block_id(i, "attn"), gate_block_id(i)] + [expert_block_id(i, e) for e in range(n_experts)]
    return ids + ["final_norm"]


def gate_kind(shared: bool) -> str:
    """The gate block's kind: `norm` (norm and router, tiny), or `mlp` where it also holds a shared part."""
    return "mlp" if shared else "norm"


def moe_block_kind_layer(n_layers: int, block: str, shared: bool = False) -> tuple[str, int]:
    """(kind, layer) of an MoE model's block id (`llama.block_kind_layer` knows only the dense ids)."""
    if block == "embed":
        return "embed", -1
    if block == "final_norm":
        return "norm", n_layers
    part, layer, _ = parse_block_id(block)
    if layer is not None and part in ("attn", "moe_gate", "expert"):
        return (gate_kind(shared) if part == "moe_gate" else part), layer
    raise KeyError(f"'{block}' is not a block id of an MoE model")


def _parse_layer_block(block: str) -> tuple[int, str, int]:
    """'layers.3.expert.5' -> (3, 'expert', 5); 'layers.3.moe_gate' -> (3, 'moe_gate', -1)."""
    part, layer, expert = parse_block_id(block)
    return layer, part, expert


def expert_weights(dense_mlp: dict, neurons_Fe: np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
    """An expert's leaves sliced from a dense MLP block (new contiguous float32 arrays); `prefix` "shared_" names
    the shared part's leaves in the gate block."""
    return {
        prefix + "w_gate": np.ascontiguousarray(dense_mlp["w_gate"][:, neurons_Fe], np.float32),
        prefix + "w_up": np.ascontiguousarray(dense_mlp["w_up"][:, neurons_Fe], np.float32),
        prefix + "w_down": np.ascontiguousarray(dense_mlp["w_down"][neurons_Fe, :], np.float32),
    }


# ------------------------------------------------------------------------------------------------------- source


class MoESource:
    """The MoE model as a block source, the interface of `GGUFSource` (what the tiers' engine reads through).

    `source(block_id) -> {leaf: float32 ndarray}` (new arrays the caller owns); `block_ids`, `block_shapes`,
    `block_nbytes`, `config`, `tokenizer_metadata()`, `nbytes_read`. Attention, embedding and final norm are passed
    through from the dense source; `layers.{i}.mlp` is replaced by the gate and expert blocks.

    Byte accounting: `nbytes_read` counts, per block read, the block's share of the authoritative bytes: an expert
    (or gate) gets the dense MLP block's file bytes × its float32 share of that block (split so the shares of a
    layer's blocks sum exactly to the dense block's file bytes); a gate also counts its router's float32 bytes.
    So reading every block once counts the dense file's bytes plus the routers'. Physically, a layer's dense MLP is
    read once and cached while its blocks are read in turn (`nbytes_read_physical` counts that, from the dense
    source); a per-expert store (the tiers' S4) holds exactly the shares.

    A distilled MoE (`deltas`, `moe_distill.MLPDeltas`) adds each layer's low-rank corrections to its dense MLP
    when that MLP is read, before any slicing (a refitted one, `moe_refit.DownRefit`, replaces its w_down there): the blocks keep their shapes and their byte shares, and the
    corrections (held in memory beside the routers, 12 MB at rank 16) are not counted as reads, unlike the
    routers, which every gate read counts.
    """

    def __init__(self, dense_source, partition: ExpertPartition, routers: Routers, deltas=None):
        cfg = dense_source.config
        self.dense = dense_source
        self.deltas = None if deltas is None else deltas.check(cfg.n_layers, cfg.d_model, cfg.d_ff)
        self.config: LlamaConfig = cfg
        self.partition = partition.check(cfg.n_layers, cfg.d_ff)
        self.n_experts = partition.n_experts
        self.routers = routers.check(cfg.n_layers, cfg.d_model, self.n_experts)
        self._ids = moe_block_ids(cfg.n_layers, self.n_experts)
        self._id_set = set(self._ids)
        self._lock = threading.RLock()
        self._cached_layer: int | None = None
        self._cached_mlp: dict | None = None
        self._cached_file_bytes = 0
        self.nbytes_read = 0
        self.nbytes_read_physical = 0

    @property
    def block_ids(self) -> list[str]:
        return list(self._ids)

    def block_kind_layer(self, block_id: str) -> tuple[str, int]:
        return moe_block_kind_layer(self.config.n_layers, block_id, self.partition.n_shared > 0)

    def tokenizer_metadata(self) -> dict:
        return self.dense.tokenizer_metadata()

    def block_shapes(self, block_id: str) -> dict:
        """{leaf: jax.ShapeDtypeStruct} as `__call__` returns it, read from nothing."""
        self._require(block_id)
        D, E, Fs = self.config.d_model, self.n_experts, self.partition.n_shared
        Fe = (self.config.d_ff - Fs) // E
        f32 = np.float32
        if block_id.endswith(".moe_gate"):
            shared = {"shared_w_gate": jax.ShapeDtypeStruct((D, Fs), f32), "shared_w_up": jax.ShapeDtypeStruct(
                (D, Fs), f32), "shared_w_down": jax.ShapeDtypeStruct((Fs, D), f32)} if Fs else {}
            return {"ffn_norm": jax.ShapeDtypeStruct((D,), f32), "router_w": jax.ShapeDtypeStruct((D, E), f32),
                    "router_b": jax.ShapeDtypeStruct((E,), f32), **shared}
        if ".expert." in block_id:
            return {"w_gate": jax.ShapeDtypeStruct((D, Fe), f32), "w_up": jax.ShapeDtypeStruct((D, Fe), f32),
                    "w_down": jax.ShapeDtypeStruct((Fe, D), f32)}
        return self.dense.block_shapes(block_id)

    def block_nbytes(self, block_id: str) -> int:
        """Float32 bytes of a block, from shapes alone."""
        return sum(4 * int(np.prod(s.shape)) for s in self.block_shapes(block_id).values())

    def _require(self, block_id: str) -> None:
        if block_id not in self._id_set:
            raise KeyError(f"unknown block '{block_id}' (MoE model has {len(self._ids)} blocks)")

    def _dense_mlp(self, layer: int) -> dict:
        if self._cached_layer != layer:
            before = getattr(self.dense, "nbytes_read", 0)
            mlp = self.dense(layer_block_id(layer, "mlp"))
            n = getattr(self.dense, "nbytes_read", 0) - before
            if self.deltas is not None:
                mlp = self.deltas.merged(layer, mlp)
            if n == 0:  # a source that does not count bytes: its float32 bytes
                n = sum(int(a.nbytes) for a in mlp.values())
            self._cached_layer, self._cached_mlp, self._cached_file_bytes = layer, mlp, n
            self.nbytes_read_physical += n
        return self._cached_mlp

    def _share(self, index: int) -> int:
        """File bytes of the layer's index-th block (0 = gate's ffn_norm and shared part, 1 + e = expert e), summing
        exactly."""
        D, F, E, Fs = self.config.d_model, self.config.d_ff, self.n_experts, self.partition.n_shared
        total = D + 3 * D * F
        gate = D + 3 * D * Fs
        cum = [0, gate] + [gate + 3 * D * ((F - Fs) // E) * (e + 1) for e in range(E)]
        nb = self._cached_file_bytes
        return nb * cum[index + 1] // total - nb * cum[index] // total

    def __call__(self, block_id: str) -> dict[str, np.ndarray]:
        self._require(block_id)
        if not (block_id.endswith(".moe_gate") or ".expert." in block_id):
            with self._lock:
                before = getattr(self.dense, "nbytes_read", 0)
                out = self.dense(block_id)
                self.nbytes_read += getattr(self.dense, "nbytes_read", 0) - before
            return out
        layer, what, e = _parse_layer_block(block_id)
        with self._lock:
            mlp = self._dense_mlp(layer)
            if what == "moe_gate":
                out = {"ffn_norm": np.array(mlp["ffn_norm"], np.float32),
                       "router_w": np.array(self.routers.w_LxDxE[layer], np.float32),
                       "router_b": np.array(self.routers.b_LxE[layer], np.float32)}
                if self.partition.n_shared:
                    out.update(expert_weights(mlp, self.partition.shared_LxFs[layer], prefix="shared_"))
                self.nbytes_read += self._share(0) + out["router_w"].nbytes + out["router_b"].nbytes
            else:
                out = expert_weights(mlp, self.partition.neurons_LxExFe[layer, e])
                self.nbytes_read += self._share(1 + e)
        return out


def moe_source(dense_source, partition: ExpertPartition, routers: Routers, deltas=None) -> MoESource:
    """The MoE model's block source over a dense Llama source (e.g. `GGUFSource`); `deltas`
    (`moe_distill.MLPDeltas`), where given, correct the dense MLPs before their neurons are sliced."""
    return MoESource(dense_source, partition, routers, deltas)


# ------------------------------------------------------------------------------------------------------ compute


def moe_router_logits(gate_w: dict, h_BxTxD):
    """float32 [B, T, E]: router logits on the normed hidden state."""
    return matmul(h_BxTxD.astype(jnp.float32), gate_w["router_w"]) + gate_w["router_b"].astype(jnp.float32)


def moe_router_probs(gate_w: dict, h_BxTxD):
    """float32 [B, T, E]: softmax router probabilities (what the controller turns into λ for expert blocks)."""
    return jax.nn.softmax(moe_router_logits(gate_w, h_BxTxD), axis=-1)


def topk_mask(scores_BxTxE, top_k: int):
    """bool [B, T, E]: each token's top_k experts by score (ties: lower index first, as `lax.top_k`)."""
    _, idx_BxTxK = jax.lax.top_k(scores_BxTxE, top_k)
    return jnp.any(jax.nn.one_hot(idx_BxTxK, scores_BxTxE.shape[-1], dtype=jnp.bool_), axis=-2)


def moe_route(cfg: LlamaConfig, gate_w: dict, x_BxTxD, top_k: int):
    """(h [B, T, D], mask [B, T, E] bool, probs [B, T, E]): the normed input and each token's chosen experts.

    The runtime calls this first, fetches the experts with `mask.any((0, 1))`, then `moe_combine`.
    """
    h = Lay.rms_norm(x_BxTxD, gate_w["ffn_norm"], cfg.norm_eps)
    probs = moe_router_probs(gate_w, h)
    return h, topk_mask(probs, top_k), probs


def expert_mlp(w: dict, h_BxTxD, prefix: str = ""):
    """One expert's SwiGLU on its neurons: W_down_e(silu(W_gate_e h) * W_up_e h), [B, T, D]; `prefix` "shared_":
    the shared part's in a gate block."""
    gated_BxTxFe = jax.nn.silu(matmul(h_BxTxD, w[prefix + "w_gate"])) * matmul(h_BxTxD, w[prefix + "w_up"])
    return matmul(gated_BxTxFe, w[prefix + "w_down"])


def add_shared(gate_w: dict, x_BxTxD, h_BxTxD):
    """x + shared(h): the shared part every token runs, where the gate block holds one; else x."""
    if "shared_w_gate" not in gate_w:
        return x_BxTxD
    return x_BxTxD + expert_mlp(gate_w, h_BxTxD, prefix="shared_")


def moe_combine(x_BxTxD, h_BxTxD, expert_ws: list, mask_BxTxE):
    """x + Σ_e [token chose e] · expert_e(h). Unweighted: the experts are slices of one dense MLP.

    `expert_ws[e]` may be None for an expert no token chose (not fetched): it contributes nothing. An expert's
    output is selected with `where`, so a token that did not choose it is untouched even by NaN/inf in its weights.
    """
    out = x_BxTxD
    for e, w in enumerate(expert_ws):
        if w is None:
            continue
        y = expert_mlp(w, h_BxTxD)
        out = out + jnp.where(mask_BxTxE[..., e:e + 1], y, jnp.zeros_like(y))
    return out


def moe_mlp_block(cfg: LlamaConfig, gate_block_w: dict, expert_ws: list, x_BxTxD, top_k: int):
    """Pre-norm MoE MLP: x + shared(h) + Σ_{e in top_k(router(h))} expert_e(h), h = rms_norm(x, ffn_norm).

    With top_k = E every expert is chosen and the result is the dense `mlp_block` (to float32 rounding).
    """
    if len(expert_ws) != gate_block_w["router_b"].shape[-1]:
        raise MoEError(f"{len(expert_ws)} expert weight dicts for a router over {gate_block_w['router_b'].shape[-1]}")
    h, mask, _ = moe_route(cfg, gate_block_w, x_BxTxD, top_k)
    return moe_combine(add_shared(gate_block_w, x_BxTxD, h), h, expert_ws, mask)


def speculative_expert_probs(router_next: dict, x_current_BxTxD, eps: float):
    """Layer l+1's router applied to layer l's residual stream (the Mixtral-offloading trick), [B, T, E].

    `router_next` is layer l+1's gate block (its ffn_norm normalises x_current as layer l+1 would); x_current is
    any residual state of layer l that exists before layer l+1's MLP (e.g. the input of layer l's MoE MLP, so the
    prefetch overlaps layer l's experts and layer l+1's attention).
    """
    h = Lay.rms_norm(x_current_BxTxD, router_next["ffn_norm"], eps)
    return moe_router_probs(router_next, h)


def moe_forward(cfg: LlamaConfig, blocks: dict, ids_BxT, top_k: int, *, collect: bool = False):
    """Logits [B, T, V] float32 of the whole MoE model on a fresh sequence (no cache kept), for evaluation.

    `blocks` maps every MoE block id to its weight dict. With `collect`, also returns per layer the MoE input x
    [B, T, D] (the residual after attention), and the residual after the MoE MLP.
    """
    B, T = ids_BxT.shape
    E = blocks[gate_block_id(0)]["router_b"].shape[-1]
    x = Lay.embed_tokens(blocks["embed"], ids_BxT, jnp.float32)
    kv = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    moe_in, moe_out = [], []
    for i in range(cfg.n_layers):
        x, _, _ = Lay.attention_block(cfg, blocks[layer_block_id(i, "attn")], x, kv, kv, 0)
        moe_in.append(x)
        x = moe_mlp_block(cfg, blocks[gate_block_id(i)], [blocks[expert_block_id(i, e)] for e in range(E)], x, top_k)
        moe_out.append(x)
    logits = Lay.lm_head(cfg, blocks["final_norm"], blocks["embed"], x)
    return (logits, moe_in, moe_out) if collect else logits
