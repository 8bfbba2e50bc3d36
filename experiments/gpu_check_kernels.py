"""One-shot GPU check of the int8 / int4 dequant-matmul kernels: build, correctness vs float64 numpy, timing.

Run on a GPU machine from the repo root (no install needed; jax with CUDA preinstalled; ~2-3 min on an H100):
    PYTHONPATH=. python experiments/gpu_check_kernels.py
CPU smoke test of this script (interpret-mode Pallas, tiny shapes, ~20 s):
    JAX_PLATFORMS=cpu python experiments/gpu_check_kernels.py --cpu-smoke

What it prints: jax version and device; one line per correctness check (relative Frobenius error of the kernel
vs ``x.astype(f64) @ W.dequantize().astype(f64)``; limits 1e-5 for float32 x, 1e-2 for bfloat16 x); the max error
per (format, dtype); the timing table of experiments/bench_kernels.py (compiled Pallas vs jnp reference vs
full-precision ``x @ W``, against the measured copy bandwidth); and PASS / FAIL. Exit code 1 on any failure.
A kernel that fails to lower is reported (first lines of the error) and the script goes on with the rest.

Imports: the repo is mapped onto ``vorch_jax`` by :func:`install_package_shim` (``vorch_jax.tiers`` -> ``tiers/``,
``vorch_jax.experiments`` -> ``experiments/``) without running any package ``__init__`` or needing an install.
If flax is missing there, a minimal ``flax.struct`` stand-in (frozen dataclass registered as a pytree) is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import os
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PACKAGE_FOLDERS = (
    ("vorch_jax", "vorch_jax"),
    ("vorch_jax.tiers", "tiers"),
    ("vorch_jax.tiers.kernels", "tiers/kernels"),
    ("vorch_jax.experiments", "experiments"),
)


def install_package_shim(repo: Path = REPO) -> None:
    """Register bare package modules so ``vorch_jax.tiers.*`` imports resolve to ``<repo>/tiers/*`` etc."""
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    for name, folder in _PACKAGE_FOLDERS:
        path = str(repo / folder)
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [path]
        module = types.ModuleType(name)
        module.__spec__, module.__path__, module.__package__ = spec, [path], name
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def install_flax_struct_standin() -> None:
    """Minimal ``flax.struct`` (``dataclass``, ``field(pytree_node=...)``) for machines without flax."""
    import jax

    def field(pytree_node=True, *, metadata=None, **kwargs):
        return dataclasses.field(metadata={**(metadata or {}), "pytree_node": pytree_node}, **kwargs)

    def dataclass(clz=None, **kwargs):
        if clz is None:
            return lambda c: dataclass(c, **kwargs)
        clz = dataclasses.dataclass(frozen=True)(clz)
        fields = dataclasses.fields(clz)
        data = [f.name for f in fields if f.metadata.get("pytree_node", True)]
        meta = [f.name for f in fields if not f.metadata.get("pytree_node", True)]
        jax.tree_util.register_dataclass(clz, data_fields=data, meta_fields=meta)
        clz.replace = lambda self, **updates: dataclasses.replace(self, **updates)
        return clz

    struct = types.ModuleType("flax.struct")
    struct.field, struct.dataclass = field, dataclass
    flax = types.ModuleType("flax")
    flax.struct = struct
    sys.modules["flax"], sys.modules["flax.struct"] = flax, struct


@dataclasses.dataclass
class Check:
    fmt: str
    dtype: str
    m: int
    k: int
    n: int
    path: str
    rel_err: float | None  # None: raised
    limit: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.rel_err is not None and self.rel_err < self.limit


def correctness_grid(smoke: bool):
    """(format, group_size, M, K, N) triples to check."""
    if smoke:
        return [("int8", None, m, 576, 192) for m in (1, 5)] + [("int4", 128, 5, 576, 192), ("int4", 32, 1, 128, 64)]
    shapes = ((576, 576), (576, 192), (576, 1536), (1536, 576))
    grid = []
    for fmt, g in (("int8", None), ("int4", 128)):
        grid += [(fmt, g, m, k, n) for (k, n) in shapes for m in (1, 16, 512)]
        grid += [(fmt, g, m, 576, 576) for m in (5, 128)]
    grid += [("int4", 32, 5, 576, 1536), ("int4", 64, 16, 1536, 576), ("int4", 64, 128, 576, 192)]
    return grid


def run_checks(smoke: bool, path: str) -> list[Check]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vorch_jax.tiers.kernels import select
    from vorch_jax.tiers.quant_int4 import quantize_int4
    from vorch_jax.tiers.quant_int8 import quantize_int8

    mode = {"pallas": "pallas", "pallas_interpret": "interpret", "reference": "reference"}[path]
    weights = {}
    checks = []
    for fmt, g, m, k, n in correctness_grid(smoke):
        key = (fmt, g, k, n)
        if key not in weights:
            w = np.random.default_rng(k * 31 + n).standard_normal((k, n)).astype(np.float32) * 0.05
            weights[key] = quantize_int8(jnp.asarray(w)) if fmt == "int8" else quantize_int4(jnp.asarray(w), g)
        qw = weights[key]
        w64 = np.asarray(qw.dequantize(jnp.float32), np.float64)
        name = fmt if g is None else f"int4/g{g}"
        for dtype, limit in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
            x = jnp.asarray(np.random.default_rng(m + k + n).standard_normal((m, k)).astype(np.float32), dtype)
            ref = np.asarray(x.astype(jnp.float32), np.float64) @ w64
            dname = jnp.dtype(dtype).name
            try:
                with select.kernel_mode(mode):
                    y = jax.jit(lambda w_, x_: w_.matmul(x_))(qw, x)
                y64 = np.asarray(y.astype(jnp.float32), np.float64)
                if y.dtype != dtype or y.shape != (m, n):
                    raise AssertionError(f"got {y.dtype}{y.shape}, want {jnp.dtype(dtype).name}{(m, n)}")
                err = float(np.linalg.norm(y64 - ref) / np.linalg.norm(ref))
                checks.append(Check(name, dname, m, k, n, path, err, limit))
            except Exception as e:  # report and go on: one failing lowering must not hide the rest
                msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
                checks.append(Check(name, dname, m, k, n, path, None, limit, " | ".join(msg[:3])[:400]))
            c = checks[-1]
            status = "ok  " if c.ok else "FAIL"
            err_s = f"{c.rel_err:.2e}" if c.rel_err is not None else "raised"
            print(f"  {status} {path:16s} {name:9s} {dname:8s} M={m:<4d} K={k:<5d} N={n:<5d} rel_err={err_s}"
                  f" (limit {limit:g}) {c.error}", flush=True)
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="force CPU, interpret-mode Pallas, tiny shapes")
    ap.add_argument("--force-flax-standin", action="store_true", help="use the flax.struct stand-in (testing)")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    install_package_shim()
    try:
        if args.force_flax_standin:
            raise ImportError("forced")
        import flax.struct  # noqa: F401
        flax_note = "flax installed"
    except ImportError:
        install_flax_struct_standin()
        flax_note = "flax.struct stand-in"

    import jax
    import jax.numpy as jnp

    from vorch_jax.experiments import bench_kernels
    from vorch_jax.tiers import quant_int8
    from vorch_jax.tiers.kernels import select

    backend = jax.default_backend()
    device = jax.devices()[0]
    print(f"python {sys.version.split()[0]}; jax {jax.__version__}; {flax_note}")
    print(f"device: {device.device_kind} (backend {backend}, platform_version "
          f"{getattr(device.client, 'platform_version', '?')})")
    mosaic_default = getattr(jax.config, "jax_pallas_use_mosaic_gpu", "n/a")
    print(f"jax_pallas_use_mosaic_gpu={mosaic_default} (the kernels pin Triton via CompilerParams)")
    print(f"modules from: {Path(quant_int8.__file__).parent}")
    if not args.cpu_smoke and backend not in select.PALLAS_BACKENDS:
        print(f"backend {backend!r} has no compiled Pallas; use --cpu-smoke for the interpret-mode smoke run")
        return 1

    kernel_path = "pallas_interpret" if args.cpu_smoke else "pallas"
    print(f"\n== correctness: kernel path {kernel_path!r} vs float64 numpy ==", flush=True)
    t0 = time.perf_counter()
    checks = run_checks(args.cpu_smoke, kernel_path)
    print("\n== correctness: jnp reference (small subset) ==", flush=True)
    checks += run_checks(True, "reference")
    print(f"(correctness phase {time.perf_counter() - t0:.1f} s)")

    print("\nmax relative error per (path, format, dtype):")
    groups: dict[tuple[str, str, str], list[Check]] = {}
    for c in checks:
        groups.setdefault((c.path, c.fmt, c.dtype), []).append(c)
    for (path, fmt, dname), cs in sorted(groups.items()):
        errs = [c.rel_err for c in cs if c.rel_err is not None]
        raised = sum(c.rel_err is None for c in cs)
        worst = f"{max(errs):.2e}" if errs else "-"
        print(f"  {path:16s} {fmt:9s} {dname:8s} max={worst}  limit={cs[0].limit:g}  checks={len(cs)}"
              f"{f'  RAISED={raised}' if raised else ''}")

    kernel_ok = all(c.ok for c in checks if c.path == kernel_path)
    before = select.kernel_paths_used()
    quant_int8.quantize_int8(jnp.ones((64, 64), jnp.float32)).matmul(jnp.ones((1, 64), jnp.bfloat16))
    after = select.kernel_paths_used()
    chosen = [key for key in after if after[key] != before.get(key, 0)]
    print(f"\nmode 'auto' on backend {backend!r} chose: {chosen}")
    if not args.skip_timing:
        print("\n== timing (median ms per call after warm-up) ==", flush=True)
        t0 = time.perf_counter()
        if args.cpu_smoke:
            rows, bw = bench_kernels.run(jnp.float32, (1,), shapes=((576, 192),), interpret_row=True)
        else:
            paths = ("pallas", "reference") if kernel_ok else ("reference",)
            if not kernel_ok:
                print("  (kernel failed a check: timing the reference and full-precision paths only)")
            rows, bw = bench_kernels.run(jnp.bfloat16, (bench_kernels.DECODE_M, bench_kernels.PREFILL_M),
                                         interpret_row=False, quantized_paths=paths)
        print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s (jitted a + 1 over 256 MiB float32, donated)")
        print(bench_kernels.format_table(rows, bw))
        print(f"(timing phase {time.perf_counter() - t0:.1f} s)")

    print(f"\npaths traced: {select.kernel_paths_used()}")
    failed = [c for c in checks if not c.ok]
    print(f"{'PASS' if not failed else 'FAIL'}: {len(checks) - len(failed)}/{len(checks)} checks within limits; "
          f"total {time.perf_counter() - t_start:.1f} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
