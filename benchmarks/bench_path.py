"""Path patching of every sender (layer 0) -> receiver (layer 1) head pair of attn-2l, against the plain
forwards it replaces.

A hook-based implementation needs 2 caching forwards (source, target), one frozen forward per sender
and one patched forward per (sender, receiver) pair: 2 + 4 + 16 = 22 plain forwards for 4 x 4 heads.
Variants, interleaved, at 8 x 256 tokens (attn-2l preset's model, random weights):
  * ``path``: ``path_patch(model, clean, corrupted, metric, L0 heads, L1 heads, "k")``;
  * ``plain``: one ``model(x)`` forward under no_grad;
  * ``hooks``: that hook-based implementation (PyTorch forward hooks, the 22 forwards), whose result
    ``path`` must equal (asserted, <= 1e-5; and some path must move the metric).
Reported: path / plain, path / (22 plain forwards), and hooks / path.

    python benchmarks/bench_path.py --device cpu --out results/bench/path.json
"""

from __future__ import annotations

from _common import attn2l, finish, interleaved, machine, med, trace_parser

import torch


def hook_path_patch(model, clean, corrupted, metric, senders, receivers):
    """Path patching of layer-0 senders -> layer-1 receivers' keys with plain forward hooks (the source
    run is ``clean``, the target ``corrupted``): 2 caching forwards, one per sender with every head's
    output frozen to the target run's but the sender's (set to the source run's) recording the layer-1
    keys, one per (sender, receiver) with only the receiver's keys patched. (len(senders), len(receivers))."""
    blocks = model.transformer.h
    d = model.config.d_head
    cols = lambda h: slice(h * d, (h + 1) * d)  # noqa: E731  head h's columns of z / of the keys

    from tests.oracle import inputs_of

    o_projs = [b.attn.c_proj for b in blocks]  # their inputs: every layer's per-head outputs z
    src, tgt = inputs_of(model, o_projs, clean), inputs_of(model, o_projs, corrupted)
    out = torch.empty(len(senders), len(receivers), device=corrupted.device)
    for i, s in enumerate(senders):
        def freeze(m, a, s=s):
            z = tgt[s.layer].clone()
            z[..., cols(s.head)] = src[s.layer][..., cols(s.head)]
            return (z,)
        keys = {}
        hs = [blocks[s.layer].attn.c_proj.register_forward_pre_hook(freeze),
              blocks[1].attn.k_proj.register_forward_hook(lambda m, a, o: keys.__setitem__("k", o.clone()))]
        model(corrupted)
        for h in hs:
            h.remove()
        for j, r in enumerate(receivers):
            def patch(m, a, o, r=r):
                o = o.clone()
                o[..., cols(r.head)] = keys["k"][..., cols(r.head)]
                return o
            h = blocks[r.layer].attn.k_proj.register_forward_hook(patch)
            out[i, j] = metric(model(corrupted).logits, corrupted).mean()
            h.remove()
    return out


def main(argv=None):
    args = trace_parser(__doc__).parse_args(argv)
    reps = args.reps or 5
    from interventions import path_patch
    from interventions.engine.adapters import get_adapter
    from interventions.engine.heads import parse_heads

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

    heads = parse_heads(senders), parse_heads(receivers)
    assert {h.layer for h in heads[0]} == {0} and {h.layer for h in heads[1]} == {1}  # what the hooks assume
    variants = {"path": lambda: path_patch(model, clean, corrupted, metric, senders, receivers, "k"),
                "plain": lambda: model(corrupted).logits,
                "hooks": lambda: hook_path_patch(model, clean, corrupted, metric, *heads)}
    with torch.no_grad():
        ours, ref = variants["path"]().cpu(), variants["hooks"]().cpu()
        base = metric(model(corrupted).logits, corrupted).mean().item()
        times = interleaved(variants, reps, args.device)
    max_diff = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape == (len(senders), len(receivers)), (ours.shape, ref.shape)
    assert max_diff <= 1e-5, f"path_patch differs from the hook implementation by {max_diff:.2e}"
    assert (ours - base).abs().max() > 1e-5, "no path moved the metric: the check would be vacuous"
    s = {k: med(v) for k, v in times.items()}
    result = {"benchmark": "path_patch", "machine": machine(args.device), "batch": args.batch, "pos": args.pos,
              "pairs": len(senders) * len(receivers), "plain_forwards_replaced": replaced, "seconds": s,
              "all_seconds": times, "path_over_plain": s["path"] / s["plain"],
              "path_over_replaced": s["path"] / (replaced * s["plain"]), "hooks_over_path": s["hooks"] / s["path"],
              "hooks_over_replaced": s["hooks"] / (replaced * s["plain"]), "max_abs_diff_vs_hooks": max_diff}
    print(f"[path] {result['pairs']} pairs: {s['path']:.2f} s = {result['path_over_plain']:.1f} plain forwards "
          f"({result['path_over_replaced']:.2f}x the {replaced} it replaces); the hook implementation "
          f"{s['hooks']:.2f} s = {result['hooks_over_path']:.2f}x path_patch (max |diff| {max_diff:.1e})", flush=True)
    return finish(result, args.out)


if __name__ == "__main__":
    main()
