"""All-heads zero-ablation sweep: ours vs plain HF forwards vs TransformerLens hooks, side by side.

For each model (the attn-2l preset's attention-only model; a 4-layer GPT-2-architecture model), on
the same random weights and the same N x pos random tokens, it times:
  * ``sweep``: ``interventions.ablation_sweep(kind="zero")`` (several heads per pass, prefix sharing; on
    a GPU, a sweep that fits one pass runs as one pass);
  * ``plain``: n_heads_total + 1 plain HF forward passes (one per head, one clean) each computing the
    per-token loss: what the sweep costs at least if done one head at a time with zero overhead;
  * ``tl``: TransformerLens the usual way: one clean forward, then one ``run_with_hooks`` forward per
    head with a hook on ``blocks.L.attn.hook_z`` zeroing that head.
and checks that the sweep's deltas and clean loss equal TL's, and its clean loss the plain forwards'
(max abs differences printed, asserted <= 1e-4). Peak memory of one sweep
vs one plain forward: CUDA ``torch.cuda.max_memory_allocated``; CPU: growth of ``the resident set
(sampled) during a call in a fresh subprocess per measurement (torch's CPU allocator is invisible to tracemalloc).

    python benchmarks/bench_sweep.py --device cpu --out results/bench/sweep.json
"""

from __future__ import annotations

import json
import subprocess
import sys

from _common import (ROOT, attn2l, base_parser, finish, gpt2_small, interleaved, machine, med, optional,
                     peak_rss_growth_mib)

import torch
import torch.nn.functional as F


TOL = 1e-4  # float32: the sweep, TransformerLens and the plain forwards agree to ~2e-6


def plain_loss(model, x):
    logits = model(x).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), x[:, 1:], reduction="none")


def to_tl(name, model):
    """The same weights in a HookedTransformer (None without transformer-lens)."""
    if optional("transformer_lens") is None:
        return None
    device = next(model.parameters()).device
    if name == "attn-2l":
        from tests.oracle import to_hooked_transformer

        tl = to_hooked_transformer(model.cpu()).to(device)
        model.to(device)
        return tl
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = model.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions,
                                  d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
                                  d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
                                  eps=c.layer_norm_epsilon, default_prepend_bos=False, device=str(device))
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(model, cfg), strict=False)
    return tl.to(device).eval()


def tl_sweep(tl, x):
    """Clean loss and (n_layers * n_heads, batch, pos - 1) deltas, one hooked forward per head."""
    def loss(logits):
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), x[:, 1:], reduction="none")

    clean = loss(tl(x, return_type="logits"))
    out = []
    for layer in range(tl.cfg.n_layers):
        for head in range(tl.cfg.n_heads):
            def hook(z, hook, head=head):  # z: [batch, pos, head, d_head]
                z[:, :, head] = 0
                return z
            logits = tl.run_with_hooks(x, return_type="logits", fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
            out.append(loss(logits) - clean)
    return clean, torch.stack(out)


def build(name, device):
    return attn2l(device) if name == "attn-2l" else gpt2_small(device)


def n_heads_total(model):
    from interventions.engine.adapters import get_adapter

    a = get_adapter(model)
    return a.n_layers * a.n_heads


def memory_child(name, variant, device, n, pos, hpp):
    """Peak memory growth of one call (run in a fresh process on CPU)."""
    model = build(name, device)
    x = torch.randint(0, 257, (n, pos), generator=torch.Generator().manual_seed(0)).to(device)
    if variant == "sweep":
        import nnsight  # noqa: F401  (its import is not the sweep's memory)
        from interventions.primitives.sweep import ablation_sweep

        fn = lambda: ablation_sweep(model, x, kind="zero", heads_per_pass=hpp)  # noqa: E731
    else:
        fn = lambda: plain_loss(model, x)  # noqa: E731
    with torch.no_grad():
        if device == "cuda":
            fn()  # once first, as on the CPU: one-time allocations (workspaces, nnsight's first trace)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        fn()  # once first: one-time costs (nnsight's first trace, thread pools) are not the call's
        return peak_rss_growth_mib(fn)


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="sequences")
    p.add_argument("--pos", type=int, default=256, help="tokens per sequence")
    p.add_argument("--heads-per-pass", type=int, default=None, help="default: the sweep's own choice")
    p.add_argument("--models", default="attn-2l,gpt2-4l")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--_memory", nargs=2, help="internal: NAME VARIANT (memory of one call)")
    args = p.parse_args(argv)
    if args._memory:
        print(json.dumps(memory_child(*args._memory, args.device, args.n, args.pos, args.heads_per_pass)))
        return None
    reps = args.reps or (5 if args.device == "cpu" else 20)
    has_nnsight = optional("nnsight") is not None
    result = {"benchmark": "sweep", "machine": machine(args.device), "n": args.n, "pos": args.pos,
              "heads_per_pass": args.heads_per_pass, "kind": "zero", "reps": reps, "models": {}}
    for name in args.models.split(","):
        model = build(name, args.device)
        x = torch.randint(0, 257, (args.n, args.pos), generator=torch.Generator().manual_seed(0)).to(args.device)
        H = n_heads_total(model)
        tl = to_tl(name, model)
        variants = {}
        if has_nnsight:
            from interventions.primitives.sweep import ablation_sweep

            variants["sweep"] = lambda: ablation_sweep(model, x, kind="zero", heads_per_pass=args.heads_per_pass)
        variants["plain"] = lambda: [plain_loss(model, x) for _ in range(H + 1)]
        if tl is not None:
            variants["tl"] = lambda: tl_sweep(tl, x)
        row = {"n_heads_total": H, "plain_forwards": H + 1}
        with torch.no_grad():
            # a fast-but-wrong variant must not win: the timed variants compute the same numbers
            if has_nnsight:
                ours_clean, ours = ablation_sweep(model, x, kind="zero", heads_per_pass=args.heads_per_pass)
                assert ours.shape == (H, *x[:, 1:].shape), ours.shape
                assert ours.abs().max() > 100 * TOL, "no head moved the loss: the checks would be vacuous"
                row["max_abs_diff_clean_vs_plain"] = (ours_clean - plain_loss(model, x).cpu()).abs().max().item()
                assert row["max_abs_diff_clean_vs_plain"] <= TOL, row
            if has_nnsight and tl is not None:
                tl_clean, ref = tl_sweep(tl, x)
                row["max_abs_diff_vs_tl"] = (ours - ref.cpu()).abs().max().item()
                row["max_abs_diff_clean_vs_tl"] = (ours_clean - tl_clean.cpu()).abs().max().item()
                print(f"[{name}] sweep vs TransformerLens: max |delta diff| = {row['max_abs_diff_vs_tl']:.2e}, "
                      f"clean {row['max_abs_diff_clean_vs_tl']:.2e}", flush=True)
                assert row["max_abs_diff_vs_tl"] <= TOL and row["max_abs_diff_clean_vs_tl"] <= TOL, row
            times = interleaved(variants, reps, args.device)
        row["seconds"] = {k: med(v) for k, v in times.items()}
        row["all_seconds"] = times
        s = row["seconds"]
        if "sweep" in s:
            row["sweep_over_plain"] = s["sweep"] / s["plain"]
            if "tl" in s:
                row["tl_over_sweep"] = s["tl"] / s["sweep"]
        if not args.no_memory:
            mem = {}
            for variant in (["sweep"] if has_nnsight else []) + ["plain_forward"]:
                if args.device == "cuda":
                    mem[variant] = memory_child(name, variant, "cuda", args.n, args.pos, args.heads_per_pass)
                else:
                    cmd = [sys.executable, __file__, "--device", "cpu", "--n", str(args.n), "--pos", str(args.pos),
                           *(["--heads-per-pass", str(args.heads_per_pass)] if args.heads_per_pass else []),
                           "--_memory", name, variant]
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
                    mem[variant] = json.loads(out.strip().splitlines()[-1])
            row["peak_memory_mib"] = mem
            row["memory_method"] = ("torch.cuda.max_memory_allocated growth" if args.device == "cuda" else
                                    "peak RSS growth during one call (sampled /proc/self/statm), fresh subprocess")
        print(f"[{name}] " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in s.items())
              + (f"; sweep/plain {row['sweep_over_plain']:.2f}x" if "sweep_over_plain" in row else "")
              + (f"; tl/sweep {row['tl_over_sweep']:.1f}x" if "tl_over_sweep" in row else "")
              + (f"; peak MiB {row['peak_memory_mib']}" if "peak_memory_mib" in row else ""), flush=True)
        result["models"][name] = row
    return finish(result, args.out)


if __name__ == "__main__":
    main()
