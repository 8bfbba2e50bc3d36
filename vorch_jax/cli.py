"""`vorch`: the command line, thin over the library. It parses, calls, prints; the work lives elsewhere.

User errors (a missing model package, a damaged model file, a bad config, an unknown option) print one line
`vorch: error: ...` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from vorch_jax.errors import VorchError, user_errors

USAGE_ERROR = 2
SUBCOMMAND_MODULES = ("vorch_jax.controller.calibrate", "vorch_jax.tooling.sweep", "vorch_jax.tooling.report", "vorch_jax.data_setup")


class UserError(VorchError):
    """A problem with the command line itself (an option, a missing argument), reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UserError(f"{message} (see `{self.prog} --help`)")


def cmd_generate(args) -> int:
    from vorch_jax.runtime.reference import ResidentModel

    if args.new_tokens < 1:
        raise UserError(f"--new-tokens must be at least 1, got {args.new_tokens}")
    spec = _real_spec(args.model)
    tok = spec.tokenizer()
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise UserError("--prompt is empty")
    out = ResidentModel(spec, args.dtype).generate([spec.bos_id()] + ids, args.new_tokens)
    print(args.prompt + tok.decode(out))
    return 0


def _real_spec(name: str):
    """The registered model `name`, which must have its weights here (a shape-only model only simulates)."""
    from vorch_jax.models import registry

    spec = registry.get(name)
    if not spec.has_weights:
        raise UserError(f"model '{name}' is shape-only (no weights here): it runs only simulated, "
                        f"`vorch run CONFIG model={name} executor=sim hardware=h100-sxm`")
    return spec


def cmd_ppl(args) -> int:
    import math

    from vorch_jax.models.corpus import kjv_text
    from vorch_jax.runtime.reference import ResidentModel

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.text == "kjv":
        text = kjv_text(max_chars=args.max_tokens * 8)
    else:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --text {args.text}: {e}") from None
    spec = _real_spec(args.model)
    body = spec.tokenizer().encode(text).ids[: args.max_tokens]
    if len(body) < args.max_tokens:
        raise UserError(f"--text {args.text} has only {len(body)} tokens, fewer than --max-tokens {args.max_tokens}")
    nll, n = ResidentModel(spec, args.dtype).nll([spec.bos_id()] + body)
    print(json.dumps({"ppl": math.exp(nll / n), "tokens": n, "nll": nll / n, "dtype": args.dtype}))
    return 0


def cmd_blocks(args) -> int:
    from vorch_jax.config import load_config
    from vorch_jax.models.blocks import summarize_blocks
    from vorch_jax.placement import resolve_placement
    from vorch_jax.runtime.setup import model_spec

    cfg = load_config(args.config, args.overrides)
    table = model_spec(cfg).blocks()
    placement = resolve_placement(cfg.placement, [b.id for b in table])
    if args.json:
        print(json.dumps(summarize_blocks(table), indent=2))
        return 0
    print(f"{'block':<20} {'kind':<6} {'layer':>5} {'bytes':>11}  placement")
    for b in table:
        p = placement[b.id]
        where = "policy decides" if p.state is None else p.state
        print(f"{b.id:<20} {b.kind:<6} {b.layer:>5} {b.nbytes:>11}  {where}{' protected' if p.protect else ''}")
    s = summarize_blocks(table)
    print(f"{s['blocks']} blocks, {s['total_bytes']} bytes")
    return 0


def cmd_run(args) -> int:
    from vorch_jax.config import load_config
    from vorch_jax.outputs import check_out_dir
    from vorch_jax.runtime.run import run

    cfg = load_config(args.config, args.overrides)
    check_out_dir(args.out)
    if args.distributed or args.coordinator or args.processes is not None or args.process_id is not None:
        from vorch_jax.runtime.mesh_run import start_processes

        start_processes(cfg.mesh.devices, coordinator=args.coordinator, processes=args.processes,
                        process_id=args.process_id)
    summary = run(cfg, args.out, progress=lambda msg: print(f"[vorch] {msg}", file=sys.stderr, flush=True))
    print(format_summary_row(summary, header=True))
    return 0


def cmd_compare(args) -> int:
    """Several policies on one config, sharing the resident reference; one table side by side."""
    from vorch_jax.config import apply_overrides, load_config
    from vorch_jax.outputs import check_out_dir
    from vorch_jax.runtime.run import compare

    cfg = load_config(args.config, args.overrides)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    check_out_dir(args.out)
    for p in policies:  # every policy name checked before any work
        apply_overrides(cfg, [f"policy={p}"])
    summaries = compare(cfg, policies, args.out,
                        progress=lambda msg: print(f"[vorch] {msg}", file=sys.stderr, flush=True))
    print(format_comparison(summaries))
    return 0


def format_comparison(summaries: list[dict]) -> str:
    lines = [format_summary_row(summaries[0], header=True).splitlines()[0]]
    lines += [format_summary_row(s) for s in summaries]
    by = {s["policy"]: s for s in summaries}
    static = by.get("static")
    lines.append("")
    lines.append(f"{'policy':<16} {'tok/s / static':>14} {'decode / floor':>14} {'exposed stall':>13} "
                 f"{'ctrl / wall':>11} {'ppl delta':>9}")
    for s in summaries:
        over_static = s["decode_tok_s"] / static["decode_tok_s"] if static else float("nan")
        exposed = s["stall_s"] / s["transfer_s"] if s.get("transfer_s") else float("nan")
        lines.append(f"{s['policy']:<16} {over_static:>14.3f} {s['decode_step_s'] / s['floor_step_s']:>14.3f} "
                     f"{exposed:>13.3f} {s['controller_s'] / s['wall_s']:>11.4f} "
                     + (f"{s['quality']['ppl'] - s['quality']['ppl_resident']:>9.4f}" if "ppl" in s["quality"] else
                        f"{'not simulated':>13}"))
    return "\n".join(lines)


def format_summary_row(s: dict, header: bool = False) -> str:
    q = s.get("quality") or {}
    cols = [
        ("policy", f"{s['policy']:<16}"),
        ("tok/s", f"{s['decode_tok_s']:>7.2f}"),
        ("stall s", f"{s['stall_s']:>8.3f}"),
        ("moved MB", f"{s['bytes_moved'] / 1e6:>9.1f}"),
        ("/belady", f"{(s['bytes_moved'] / s['belady_bytes']) if s['belady_bytes'] else float('nan'):>8.3f}"),
        ("/bound", f"{(s['bytes_moved'] / s['lower_bound_bytes']) if s.get('lower_bound_bytes') else float('nan'):>7.3f}"),
        ("peak MB", f"{s['peak_device_bytes'] / 1e6:>8.1f}"),
        ("budget MB", f"{s['hbm_budget_bytes'] / 1e6:>9.1f}"),
        ("ppl", f"{q['ppl']:>7.3f}" if "ppl" in q else f"{'sim':>7}"),
        ("same tokens", f"{str(s.get('tokens_match_resident', '-')):>11}"),
    ]
    row = " ".join(v for _, v in cols)
    if not header:
        return row
    head = " ".join(f"{name:>{len(v)}}" if i else f"{name:<{len(v)}}" for i, (name, v) in enumerate(cols))
    return head + "\n" + row


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from vorch_jax.versions import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vorch", description="Dynamic multi-tier weight residency for LLM inference.")
    p.add_argument("--version", action=_VersionAction, help="print the versions of vorch_jax, jax, flax, orbax, "
                                                            "tensorstore and the backend, and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="greedy continuation of a prompt (all blocks resident)")
    g.add_argument("--model", default="smollm2-135m", help="a registered model (default smollm2-135m)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--new-tokens", type=int, default=16)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("ppl", help="perplexity of the model on a text (BOS prepended), as one JSON line")
    q.add_argument("--model", default="smollm2-135m", help="a registered model (default smollm2-135m)")
    q.add_argument("--text", default="kjv", help="a UTF-8 file, or 'kjv' for the King James Bible (default)")
    q.add_argument("--max-tokens", type=int, default=512)
    q.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    q.set_defaults(func=cmd_ppl)

    r = sub.add_parser("run", help="generate under an HBM budget and a policy; write summary.json and traces")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. policy=lru hbm_budget=0.3")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--distributed", action="store_true", help="one of several processes of a mesh run: JAX finds "
                   "the others (TPU slice, SLURM, Open MPI); or give the three options below")
    r.add_argument("--coordinator", help="host:port of process 0 of a multi-process mesh run")
    r.add_argument("--processes", type=int, help="how many processes the mesh run has")
    r.add_argument("--process-id", type=int, help="this process's index, 0..processes-1")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="several policies on one config, side by side (shares the resident run)")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every policy")
    c.add_argument("--policies", default="resident,static,static-prefetch,lru,scored,belady")
    c.add_argument("--out", required=True, help="output directory; one sub-directory per policy")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("blocks", help="the model's residency blocks and where a config places them")
    b.add_argument("config", nargs="?", default=None)
    b.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    b.add_argument("--json", action="store_true", help="print count and bytes per kind as JSON")
    b.set_defaults(func=cmd_blocks)

    # Sub-commands that live beside their library module: each module's `add_cli(subparsers)` adds its parser.
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except user_errors() as e:
        print(f"vorch: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("vorch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
