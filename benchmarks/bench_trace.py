"""One intervention trace (zero-ablate one head) vs a plain forward, at batch 8 x 256 tokens.

Variants, interleaved, on the attn-2l preset's model (random weights):
  * ``plain``: ``model(x).logits`` under no_grad;
  * ``toolkit``: ``run_with_ablations(model, x, [ZeroAblation("L1H0")])`` (input checks, the nnsight
    trace, and the check that the edit took effect);
  * ``engine``: the same run given to the engine directly, ``execute(model, Run(x, writes=[Write("L1.z",
    None, head=0)]))``: the toolkit less the ablation layer (its ablation objects and their checks);
  * ``nnsight``: a bare nnsight trace doing the same edit (slice of the o_proj input set to 0, logits
    saved): nnsight's own overhead without the toolkit's checks;
  * ``empty``: an nnsight trace with an empty body (nothing read, nothing written): the floor any
    nnsight-based trace pays.
The toolkit's and the bare trace's logits are asserted equal (<= 1e-5) and different from the plain
forward's (the edit took effect). Target: toolkit / plain <= 1.05. Each round runs the variants in a fresh random order (seeded).

    python benchmarks/bench_trace.py --device cpu --out results/bench/trace.json
"""

from __future__ import annotations

from _common import attn2l, finish, interleaved, machine, med, optional, trace_parser

import torch


def main(argv=None):
    args = trace_parser(__doc__).parse_args(argv)
    reps = args.reps or (100 if args.device == "cpu" else 200)
    model = attn2l(args.device)
    x = torch.randint(0, 257, (args.batch, args.pos), generator=torch.Generator().manual_seed(0)).to(args.device)
    variants = {"plain": lambda: model(x).logits}
    result = {"benchmark": "trace", "machine": machine(args.device), "batch": args.batch, "pos": args.pos,
              "reps": reps, "head": "L1H0"}
    if optional("nnsight") is not None:
        from interventions import ZeroAblation, run_with_ablations, wrap

        lm = wrap(model)  # the wrapper the engine uses (bare nnsight.NNsight)
        d_head = model.config.d_head

        def bare():
            with lm.trace(x):
                lm.transformer.h[1].attn.c_proj.input[:, :, 0:d_head] = 0
                out = lm.lm_head.output.save()
            return out

        def empty():
            with lm.trace(x):
                pass

        from interventions.engine.tracing import Run, Write, execute

        abl = [ZeroAblation("L1H0")]
        writes = [Write("L1.z", None, head=0)]
        variants["toolkit"] = lambda: run_with_ablations(model, x, abl)
        variants["engine"] = lambda: execute(model, Run(x, writes=writes)).logits
        variants["nnsight"] = bare
        variants["empty"] = empty
        with torch.no_grad():  # the bare trace must equal the toolkit's, and the edit must change the logits
            ours, theirs, clean = variants["toolkit"](), bare(), model(x).logits
            result["max_abs_diff_bare_vs_toolkit"] = (theirs - ours).abs().max().item()
            result["max_abs_diff_edit_vs_plain"] = (ours - clean).abs().max().item()
        assert ours.shape == theirs.shape == clean.shape, (ours.shape, theirs.shape, clean.shape)
        assert result["max_abs_diff_bare_vs_toolkit"] <= 1e-5, result
        assert torch.equal(variants["engine"](), ours), "the engine variant must run the toolkit's edit"
        assert result["max_abs_diff_edit_vs_plain"] > 1e-3, "the ablation changed nothing: the check is vacuous"
    with torch.no_grad():
        times = interleaved(variants, reps, args.device, warmup=2, shuffle=True)
    s = {k: med(v) for k, v in times.items()}
    result.update(seconds=s, all_seconds=times)
    for k in ("toolkit", "engine", "nnsight", "empty"):
        if k in s:
            # median of per-round ratios: each round times the variants back to back, so slow drift of a
            # shared machine cancels (the ratio of medians is kept as *_ratio_of_medians)
            result[f"{k}_over_plain"] = med([a / b for a, b in zip(times[k], times["plain"])])
            result[f"{k}_ratio_of_medians"] = s[k] / s["plain"]
            # ratio of the fastest runs: noise on a shared machine only ever adds time (as timeit's min)
            result[f"{k}_ratio_of_minimums"] = min(times[k]) / min(times["plain"])
            result[f"{k}_overhead_ms"] = (s[k] - s["plain"]) * 1e3
    if "nnsight" in times:  # the toolkit's own cost: median of per-round differences to the bare trace
        result["toolkit_over_bare_us"] = med([a - b for a, b in zip(times["toolkit"], times["nnsight"])]) * 1e6
        result["engine_over_bare_us"] = med([a - b for a, b in zip(times["engine"], times["nnsight"])]) * 1e6
    print("[trace] " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in s.items()) + "; " +
          ", ".join(f"{k} {result[k]:.3f}x" for k in ("toolkit_over_plain", "engine_over_plain", "nnsight_over_plain",
                                                      "empty_over_plain",
                                                      "toolkit_ratio_of_minimums", "nnsight_ratio_of_minimums")
                    if k in result) +
          (f"; over the bare trace: toolkit {result['toolkit_over_bare_us']:.0f} us, engine "
           f"{result['engine_over_bare_us']:.0f} us" if "toolkit_over_bare_us" in result else ""),
          flush=True)
    return finish(result, args.out)


if __name__ == "__main__":
    main()
