"""An independent float64 numpy Llama, sharing nothing with vorch_jax's model code but the GGUF file.

It reads tensors with `gguf` directly, un-permutes GGUF's Q/K rows back to the Hugging Face layout and applies RoPE
with the rotate-half convention: so an agreement with the model (which rotates adjacent pairs on GGUF's layout)
checks the permutation, not a shared bug.
"""

from __future__ import annotations

import numpy as np


def _unpermute(w_out_in: np.ndarray, n_head: int) -> np.ndarray:
    out, inp = w_out_in.shape
    return w_out_in.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


class NumpyLlama:
    def __init__(self, gguf_path):
        import gguf

        r = gguf.GGUFReader(str(gguf_path))
        f = lambda k: r.fields[k].contents()  # noqa: E731
        self.n_layers = int(f("llama.block_count"))
        self.n_head = int(f("llama.attention.head_count"))
        self.n_kv = int(f("llama.attention.head_count_kv"))
        self.eps = float(f("llama.attention.layer_norm_rms_epsilon"))
        self.base = float(f("llama.rope.freq_base"))
        t = {x.name: x for x in r.tensors}
        g = lambda name: gguf.quants.dequantize(t[name].data, t[name].tensor_type).astype(np.float64)  # noqa: E731
        self.emb = g("token_embd.weight")  # [V, D]
        self.d = self.emb.shape[1]
        self.dh = self.d // self.n_head
        self.out_norm = g("output_norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            p = f"blk.{i}."
            self.layers.append(
                dict(
                    an=g(p + "attn_norm.weight"),
                    q=_unpermute(g(p + "attn_q.weight"), self.n_head),  # [out, in], HF layout
                    k=_unpermute(g(p + "attn_k.weight"), self.n_kv),
                    v=g(p + "attn_v.weight"),
                    o=g(p + "attn_output.weight"),
                    fn=g(p + "ffn_norm.weight"),
                    gate=g(p + "ffn_gate.weight"),
                    up=g(p + "ffn_up.weight"),
                    down=g(p + "ffn_down.weight"),
                )
            )

    def _norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x_THD):
        T, _, dh = x_THD.shape
        inv = self.base ** (-np.arange(0, dh, 2) / dh)
        ang = np.arange(T)[:, None] * inv[None, :]  # [T, dh/2]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        rot = np.concatenate([-x_THD[..., dh // 2 :], x_THD[..., : dh // 2]], -1)
        return x_THD * cos + rot * sin

    def logits(self, ids) -> np.ndarray:
        """Logits [T, V] for one sequence, full causal attention, float64."""
        T = len(ids)
        x = self.emb[np.asarray(ids)]
        mask = np.tril(np.ones((T, T), bool))
        rep = self.n_head // self.n_kv
        for L in self.layers:
            h = self._norm(x, L["an"])
            q = self._rope((h @ L["q"].T).reshape(T, self.n_head, self.dh))
            k = self._rope((h @ L["k"].T).reshape(T, self.n_kv, self.dh))
            v = (h @ L["v"].T).reshape(T, self.n_kv, self.dh)
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(self.dh)
            s = np.where(mask[None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = np.einsum("hts,shd->thd", s, v).reshape(T, self.d)
            x = x + a @ L["o"].T
            h = self._norm(x, L["fn"])
            gte = h @ L["gate"].T
            x = x + ((gte / (1 + np.exp(-gte))) * (h @ L["up"].T)) @ L["down"].T
        return self._norm(x, self.out_norm) @ self.emb.T
