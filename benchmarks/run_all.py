"""Run the sweep, trace and training benchmarks; write one JSON and print a markdown table.

Parts that need nnsight (the sweep, the traces) or transformer-lens (the TL sweep) are skipped, and
say so, where those packages are not importable (e.g. a bare GPU box with only torch + transformers).

    python benchmarks/run_all.py --device cpu --out results/bench/cpu.json
    python3 benchmarks/run_all.py --device cuda --out $OUT/bench_cuda.json
"""

from __future__ import annotations

import traceback

from _common import base_parser, finish, machine, optional

import bench_sweep
import bench_trace
import bench_train


def _fmt(x, spec=".2f", suffix="x"):
    return "skipped" if x is None else f"{x:{spec}}{suffix}"


def table(res: dict) -> str:
    rows = ["| benchmark | measured | target | met |", "|---|---|---|---|"]

    def add(name, value, target, ok, spec=".2f", suffix="x"):
        rows.append(f"| {name} | {_fmt(value, spec, suffix)} | {target} | "
                    f"{'-' if value is None else ('yes' if ok(value) else 'NO')} |")

    for model, r in (res.get("sweep") or {}).get("models", {}).items():
        s = r.get("seconds", {})
        add(f"sweep {model}: sweep / {r['plain_forwards']} plain forwards (time)", r.get("sweep_over_plain"),
            "<= 0.8x", lambda v: v <= 0.8)
        add(f"sweep {model}: TransformerLens hook_z / sweep (time)", r.get("tl_over_sweep"), ">= 3x",
            lambda v: v >= 3)
        add(f"sweep {model}: max abs diff vs TL", r.get("max_abs_diff_vs_tl"), "<= 1e-4", lambda v: v <= 1e-4,
            ".1e", "")
        rows.append(f"| sweep {model}: seconds | " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()) + " | | |")
        mem = r.get("peak_memory_mib")
        if mem:
            rows.append(f"| sweep {model}: peak memory MiB ({r['memory_method']}) | "
                        + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()) + " | | |")
    t = res.get("trace") or {}
    add("trace: toolkit zero-ablation / plain forward", t.get("toolkit_over_plain"), "<= 1.10x", lambda v: v <= 1.10,
        ".3f")
    add("trace: bare nnsight trace / plain forward", t.get("nnsight_over_plain"), "(info)", lambda v: True, ".3f")
    tr = res.get("train") or {}
    add("train: trainer / plain loop (tokens/s)", tr.get("trainer_over_plain"), ">= 0.95x", lambda v: v >= 0.95,
        ".3f")
    add("train: plain fused AdamW / plain (tokens/s)", tr.get("plain_fused_over_plain"), "(info)", lambda v: True,
        ".3f")
    if "plain_compiled_over_plain" in tr:
        add("train: plain torch.compile / plain (tokens/s)", tr["plain_compiled_over_plain"], "(info)",
            lambda v: True, ".3f")
    add("train: data loading share of trainer step", tr.get("data_share_of_trainer_step"), "(info)",
        lambda v: True, ".1%", "")
    if tr.get("tokens_per_s"):
        rows.append("| train: tokens/s | " + ", ".join(f"{k} {v:,.0f}" for k, v in tr["tokens_per_s"].items())
                    + " | | |")
    return "\n".join(rows)


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="sweep,trace,train")
    p.add_argument("--compile", action="store_true", help="bench_train: also time torch.compile")
    args = p.parse_args(argv)
    common = ["--device", args.device] + (["--reps", str(args.reps)] if args.reps else [])
    res = {"machine": machine(args.device), "skipped": {}}
    if optional("nnsight") is None:
        res["skipped"]["nnsight"] = "not importable: ablation sweep and traces skipped (plain baselines still timed)"
    if optional("transformer_lens") is None:
        res["skipped"]["transformer_lens"] = "not importable: TransformerLens sweep and the equality check skipped"
    runs = {"sweep": (bench_sweep, []), "trace": (bench_trace, []),
            "train": (bench_train, ["--compile"] if args.compile else [])}
    for name in args.only.split(","):
        mod, extra = runs[name]
        try:
            res[name] = mod.main(common + extra)
        except Exception as e:  # one failing part must not lose the others
            traceback.print_exc()
            res[name] = None
            res["skipped"][name] = f"failed: {type(e).__name__}: {e}"
    finish(res, args.out)
    print()
    print(f"Machine: {res['machine'].get('gpu') or res['machine'].get('platform')}, "
          f"{res['machine'].get('cpu_count')} CPUs, load average at start {res['machine'].get('loadavg_start')}, "
          f"at end {res['machine'].get('loadavg_end')}")
    for k, v in res["skipped"].items():
        print(f"Skipped {k}: {v}")
    print(table(res))
    return res


if __name__ == "__main__":
    main()
