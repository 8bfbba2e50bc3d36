"""An independent float64 numpy Gemma 3, sharing nothing with vorch_jax's model code but the GGUF file.

Written from the Gemma 3 architecture as Hugging Face's `Gemma3ForCausalLM` computes it: embeddings scaled by
sqrt(d_model); per layer input norm, attention with per-head q/k RMS norms, rotate-half RoPE (base 1e4 on sliding
layers, the GGUF's base on every sixth, global, layer), scores scaled by head_dim^-1/2, a sliding window on local
layers; post-attention norm; pre- and post-feed-forward norms around a tanh-GELU GeGLU; final norm; tied head. The
GGUF's norm weights already include Gemma's +1. Tensors are read with `gguf` directly, in [out, in] layout.
"""

from __future__ import annotations

import numpy as np


class NumpyGemma:
    def __init__(self, gguf_path, local_rope_base: float = 10000.0, global_every: int = 6):
        import gguf

        r = gguf.GGUFReader(str(gguf_path))
        f = lambda k: r.fields[k].contents()  # noqa: E731
        a = "gemma3."
        self.n_layers = int(f(a + "block_count"))
        self.n_head = int(f(a + "attention.head_count"))
        self.n_kv = int(f(a + "attention.head_count_kv"))
        self.dh = int(f(a + "attention.key_length"))
        self.eps = float(f(a + "attention.layer_norm_rms_epsilon"))
        self.global_base = float(f(a + "rope.freq_base"))
        self.window = int(f(a + "attention.sliding_window"))
        self.local_base, self.every = local_rope_base, global_every
        t = {x.name: x for x in r.tensors}
        g = lambda name: gguf.quants.dequantize(t[name].data, t[name].tensor_type).astype(np.float64)  # noqa: E731
        self.emb = g("token_embd.weight")  # [V, D]
        self.d = self.emb.shape[1]
        self.out_norm = g("output_norm.weight")
        names = dict(an="attn_norm", q="attn_q", k="attn_k", v="attn_v", o="attn_output", qn="attn_q_norm",
                     kn="attn_k_norm", pan="post_attention_norm", fn="ffn_norm", gate="ffn_gate", up="ffn_up",
                     down="ffn_down", pfn="post_ffw_norm")
        self.layers = [{k: g(f"blk.{i}.{n}.weight") for k, n in names.items()} for i in range(self.n_layers)]

    def _norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    @staticmethod
    def _rope(x_THD, base):
        T, _, dh = x_THD.shape
        inv = base ** (-np.arange(0, dh, 2) / dh)
        ang = np.arange(T)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x1, x2 = x_THD[..., : dh // 2], x_THD[..., dh // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    @staticmethod
    def _gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    def logits(self, ids) -> np.ndarray:
        """Logits [T, V] for one sequence, float64."""
        T = len(ids)
        x = self.emb[np.asarray(ids)] * np.sqrt(self.d)
        q_pos, k_pos = np.arange(T)[:, None], np.arange(T)[None, :]
        rep = self.n_head // self.n_kv
        for i, L in enumerate(self.layers):
            is_global = (i + 1) % self.every == 0
            mask = (k_pos <= q_pos) & (is_global | (k_pos > q_pos - self.window))
            base = self.global_base if is_global else self.local_base
            h = self._norm(x, L["an"])
            q = self._norm((h @ L["q"].T).reshape(T, self.n_head, self.dh), L["qn"])
            k = self._norm((h @ L["k"].T).reshape(T, self.n_kv, self.dh), L["kn"])
            v = (h @ L["v"].T).reshape(T, self.n_kv, self.dh)
            q, k = self._rope(q, base), self._rope(k, base)
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(self.dh)
            s = np.where(mask[None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = np.einsum("hts,shd->thd", s, v).reshape(T, self.n_head * self.dh)
            x = x + self._norm(a @ L["o"].T, L["pan"])
            h = self._norm(x, L["fn"])
            m = (self._gelu_tanh(h @ L["gate"].T) * (h @ L["up"].T)) @ L["down"].T
            x = x + self._norm(m, L["pfn"])
        return self._norm(x, self.out_norm) @ self.emb.T
