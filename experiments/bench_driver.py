"""The driver's cost: policy=resident through the driver against one jitted whole-model decode step, per model.

Run:   .venv/bin/python experiments/bench_driver.py [--models smollm2-135m gemma3-270m] [--tokens 24] [--rounds 3]
Takes: about 2 minutes per model on 2 CPU cores.

For each model, in one process, `--rounds` times alternating:
  * fused: the spec's own ops for every position of a pass traced into ONE `jax.jit` (the model as a single XLA
    program, no host between positions), median decode step over `--tokens` greedy steps;
  * driver: `vorch run` with policy=resident (every block on device, the ledger, engine, cursor and driver loop as
    in any run), its summary's decode step;
  * ops: the same ops called one after another from Python, each its own jitted call (no driver, ledger or
    engine): what running block by block costs before any residency logic, since every block boundary is a
    program boundary when a block may be absent;
  * host: the driver's own work per position, the same run with each op's dispatch replaced by nothing (fetch,
    prefetch check, ledger bookkeeping, cursor, access record).
Prints per model the medians, driver / fused, ops / fused, driver / ops and the host time per position. Target on
this CPU: driver <= 1.10x fused; driver / ops is the driver's own share, ops / fused the cost of block granularity.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vorch_jax.config import load_config  # noqa: E402
from vorch_jax.runtime.run import run  # noqa: E402
from vorch_jax.runtime.setup import build_setup  # noqa: E402


def fused_step_s(setup, tokens: int, fused: bool = True) -> float:
    """Median decode step of the whole pass as one jitted function over the spec's ops (`fused`), or of the same
    ops called one after another from Python, each its own jitted call, with no driver, ledger or engine."""
    spec = setup.spec
    compute = spec.compute(jnp.float32)
    positions = spec.skeleton()
    weights = {b: {k: jnp.asarray(v) for k, v in spec.source()(b).items()} for b in setup.block_ids}

    def step(weights, ids, cache, pos):
        c = compute.start(ids, cache, pos)
        for p in positions:
            compute.run(p, weights[p.block], c)
        return compute.finish(c)

    if fused:
        step = jax.jit(step)

    P = len(setup.prompt_ids)
    cache = spec.new_cache(1, P + tokens + 1, jnp.float32)
    logits, cache = step(weights, jnp.asarray([setup.prompt_ids], jnp.int32), cache, 0)
    nxt, times = int(jnp.argmax(logits[0, -1])), []
    for i in range(tokens):
        t0 = time.perf_counter()
        logits, cache = step(weights, jnp.asarray([[nxt]], jnp.int32), cache, P + i)
        nxt = int(jnp.argmax(logits[0, -1]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def driver_step_s(cfg, out_dir) -> tuple[float, int]:
    """(decode step, positions per pass) of policy=resident through the driver, as `vorch run` runs it."""
    s = run(cfg, out_dir)
    return s["decode_step_s"], s["hits"] // cfg.new_tokens


def host_step_s(cfg, out_dir) -> float:
    """A decode step of the same driver, ledger, engine and resident policy whose ops dispatch nothing: the host's
    own work per pass (fetch, prefetch check, ledger bookkeeping, cursor, access record)."""
    from vorch_jax.runtime.cursor import PassCursor
    from vorch_jax.runtime.driver import Driver, greedy_generate
    from vorch_jax.runtime.inputs import make_policy, policy_context
    from vorch_jax.runtime.ledger import Ledger
    from vorch_jax.runtime.real import RealBackend
    from vorch_jax.tiers.engine import MovementEngine

    class NoCompute(RealBackend):
        def begin_pass(self, ids_BxT, cache, pos, passes):
            self.carry = cache

        def run(self, position, w):
            return None

        def end_pass(self):
            return None, self.carry

        def next_token(self, logits):
            return 0

    setup = build_setup(cfg)
    policy = make_policy(cfg, policy_context(cfg, setup, ()), None)
    engine = MovementEngine(setup.source, Path(out_dir) / "nvme", keep_home=True)
    try:
        for b in setup.block_ids:
            engine.register(b, setup.homes[b])
        ledger = Ledger(setup.info, PassCursor(setup.spec), engine, policy, budget_bytes=setup.hbm_budget,
                        device_bytes=setup.device_bytes, homes=setup.homes, state_bytes=setup.state_bytes,
                        tick_every_n_layers=cfg.tick_every_n_layers)
        ledger.place_initial()
        gen = greedy_generate(Driver(setup.spec, ledger, NoCompute(setup.spec, jnp.float32)), setup.prompt_ids,
                              cfg.new_tokens, jnp.float32)
        w0, w1, n = gen.measured_window()
        return (w1 - w0) / n
    finally:
        engine.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; {args.tokens} decode "
          f"tokens, {args.rounds} rounds, medians")
    print(f"{'model':14s} {'fused ms':>9s} {'ops ms':>9s} {'driver ms':>9s} {'driver/fused':>12s} {'ops/fused':>9s} "
          f"{'driver/ops':>10s} {'host ms/pass':>12s} {'host us/pos':>11s} {'positions':>9s}   "
          f"rounds (fused / ops / driver ms)")
    for model in args.models:
        cfg = load_config(None, [f"model={model}", "policy=resident", "hbm_budget=1.0", f"new_tokens={args.tokens}",
                                 "prompt_tokens=16", "eval_tokens=16", "placement=[]"])
        setup = build_setup(cfg)
        fused, ops, driver, host = [], [], [], []
        with tempfile.TemporaryDirectory() as d:
            for r in range(args.rounds):
                fused.append(fused_step_s(setup, args.tokens))
                ops.append(fused_step_s(setup, args.tokens, fused=False))
                step, positions = driver_step_s(cfg, Path(d) / f"run{r}")
                driver.append(step)
                host.append(host_step_s(cfg, Path(d) / f"host{r}"))
        f, o, dr, h = (statistics.median(x) for x in (fused, ops, driver, host))
        rounds = " ".join(f"{a * 1e3:.1f}/{b * 1e3:.1f}/{c * 1e3:.1f}" for a, b, c in zip(fused, ops, driver))
        print(f"{model:14s} {f * 1e3:9.2f} {o * 1e3:9.2f} {dr * 1e3:9.2f} {dr / f:12.3f} {o / f:9.3f} {dr / o:10.3f} "
              f"{h * 1e3:12.2f} {h / positions * 1e6:11.1f} {positions:9d}   {rounds}", flush=True)
    return 0


if __name__ == "__main__":
    main()
