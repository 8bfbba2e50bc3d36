"""The notebook API: wrap a model with a budget and a policy, generate, read back what it cost.

    from vorch_jax.api import VOrchestrate
    vo = VOrchestrate("smollm2-135m", hbm_budget_gb=0.25, psi_threshold=0.7, tick_every_n_layers=4,
                      enable_prefetch=True)
    text = vo.generate("The capital of France is", new_tokens=16)
    vo.summary["decode_tok_s"], vo.summary["bytes_moved"], vo.trace[:3]

The same machinery as `vorch run`: a `RunConfig` built from the arguments (any other config key may be passed as a
keyword, dotted keys with `__`, e.g. `score__beta=2.0`), `runner.run` writing summary.json and the traces.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from vorch_jax.config import ConfigError, apply_overrides, config_from_dict, config_to_dict


class VOrchestrate:
    def __init__(self, model: str = "smollm2-135m", *, hbm_budget_gb: float | None = None, hbm_budget=0.5,
                 psi_threshold: float = 0.7, tick_every_n_layers: int = 4, enable_prefetch: bool = True,
                 policy: str = "scored", prefetch_depth: int = 2, out_dir: str | Path | None = None, **config):
        if hbm_budget_gb is not None:
            if not hbm_budget_gb > 0:
                raise ConfigError(f"hbm_budget_gb must be > 0, got {hbm_budget_gb}")
            hbm_budget = f"{hbm_budget_gb}GB"
        data = {"model": model, "policy": policy, "hbm_budget": hbm_budget,
                "tick_every_n_layers": tick_every_n_layers, "prefetch_depth": prefetch_depth if enable_prefetch else 0,
                "guardrail": {"psi_threshold": psi_threshold}}
        overrides = [f"{k.replace('__', '.')}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in config.items()]
        self.config = apply_overrides(config_from_dict(data, source="VOrchestrate(...)"), overrides)
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="vorch-"))
        self.summary: dict | None = None

    def generate(self, prompt: str, new_tokens: int = 16) -> str:
        """Greedy continuation of `prompt` under the budget and policy; the cost lands in `summary` and `trace`."""
        from vorch_jax.runtime.run import run

        cfg = apply_overrides(self.config, [f"prompt={prompt}", f"new_tokens={new_tokens}"])
        self.summary = run(cfg, self.out_dir)
        return self.summary["text"]

    @property
    def trace(self) -> list[dict]:
        """The last run's trace, one dict per event (access, transition, stall)."""
        path = self.out_dir / "trace.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def trace_path(self) -> Path:
        return self.out_dir / "trace.perfetto.json"

    def __repr__(self) -> str:
        c = config_to_dict(self.config)
        return f"VOrchestrate(model={c['model']!r}, policy={c['policy']!r}, hbm_budget={c['hbm_budget']!r}, out={self.out_dir})"
