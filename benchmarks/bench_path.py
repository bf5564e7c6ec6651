"""Path patching of every sender (layer 0) -> receiver (layer 1) head pair of attn-2l, against the plain
forwards it replaces.

A hook-based implementation needs 2 caching forwards (source, target), one frozen forward per sender
and one patched forward per (sender, receiver) pair: 2 + 4 + 16 = 22 plain forwards for 4 x 4 heads.
Variants, interleaved, at 8 x 256 tokens (attn-2l preset's model, random weights):
  * ``path``: ``path_patch(model, clean, corrupted, metric, L0 heads, L1 heads, "k")``;
  * ``plain``: one ``model(x)`` forward under no_grad.
Reported: path / plain, and path / (22 plain forwards).

    python benchmarks/bench_path.py --device cpu --out results/bench/path.json
"""

from __future__ import annotations

from _common import attn2l, finish, interleaved, machine, med, trace_parser

import torch


def main(argv=None):
    args = trace_parser(__doc__).parse_args(argv)
    reps = args.reps or 5
    from interventions import path_patch
    from interventions.engine.adapters import get_adapter

    model = attn2l(args.device)
    a = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 257, (args.batch, args.pos), generator=g).to(args.device)
    corrupted = torch.randint(0, 257, (args.batch, args.pos), generator=g).to(args.device)
    senders = [f"L0H{h}" for h in range(a.n_heads)]
    receivers = [f"L1H{h}" for h in range(a.n_heads)]
    replaced = 2 + len(senders) + len(senders) * len(receivers)

    def metric(logits, tokens):
        return logits[:, -1].float().log_softmax(-1).gather(-1, tokens[:, -1:]).squeeze(-1)

    variants = {"path": lambda: path_patch(model, clean, corrupted, metric, senders, receivers, "k"),
                "plain": lambda: model(corrupted).logits}
    with torch.no_grad():
        times = interleaved(variants, reps, args.device)
    s = {k: med(v) for k, v in times.items()}
    result = {"benchmark": "path_patch", "machine": machine(args.device), "batch": args.batch, "pos": args.pos,
              "pairs": len(senders) * len(receivers), "plain_forwards_replaced": replaced, "seconds": s,
              "all_seconds": times, "path_over_plain": s["path"] / s["plain"],
              "path_over_replaced": s["path"] / (replaced * s["plain"])}
    print(f"[path] {result['pairs']} pairs: {s['path']:.2f} s = {result['path_over_plain']:.1f} plain forwards "
          f"({result['path_over_replaced']:.2f}x the {replaced} it replaces)", flush=True)
    return finish(result, args.out)


if __name__ == "__main__":
    main()
