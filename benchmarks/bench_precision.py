"""Trainer speed levers on this CPU, side by side in one process: fp32 vs bf16 autocast vs
torch.compile, 1 vs 2 threads, d_model 96 vs 128; plus two single-threaded runs in parallel processes.

    python benchmarks/bench_precision.py [--steps 40] [--out benchmarks/results/cpu_precision.json]

Prints tokens/s per variant (median step time over interleaved rounds) and ratios to fp32 at the
same width and threads. Run it alone: the machine has 2 cores.
"""

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, CTX = 8, 256


def _model(d_model: int, n_layers: int = 2):
    import torch

    from interventions.zoo.model import AttnOnlyConfig, AttnOnlyForCausalLM

    torch.manual_seed(0)
    m = AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=n_layers, n_heads=4, d_model=d_model, n_ctx=CTX,
                                           vocab_size=257)).train()
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def _step(m, opt, x, bf16: bool, fwd=None):
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = (fwd if fwd is not None else m)(x).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 257).float(), x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()


def in_process(steps: int) -> dict:
    import torch

    x = torch.randint(0, 257, (BATCH, CTX))
    variants = {}
    for d in (96, 128):
        for kind in ("fp32", "bf16", "compile"):
            m, opt = _model(d)
            fwd = torch.compile(m) if kind == "compile" else None
            variants[(d, kind)] = (m, opt, fwd)
    times = {(d, kind, t): [] for (d, kind) in variants for t in (1, 2)}
    for (d, kind), (m, opt, fwd) in variants.items():  # warm-up (and compilation)
        for _ in range(3):
            _step(m, opt, x, kind == "bf16", fwd)
    for _ in range(steps):
        for (d, kind, t) in times:
            m, opt, fwd = variants[(d, kind)]
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            _step(m, opt, x, kind == "bf16", fwd)
            times[(d, kind, t)].append(time.perf_counter() - t0)
    out = {}
    for (d, kind, t), v in times.items():
        med = statistics.median(v)
        base = statistics.median(times[(d, "fp32", t)])
        out[f"d{d}_{kind}_{t}thr"] = {"tokens_per_s": BATCH * CTX / med, "ratio_to_fp32": base / med}
    return out


def _solo(args):
    d, steps = args
    import torch

    torch.set_num_threads(1)
    m, opt = _model(d)
    x = torch.randint(0, 257, (BATCH, CTX))
    for _ in range(3):
        _step(m, opt, x, False)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(m, opt, x, False)
    return BATCH * CTX * steps / (time.perf_counter() - t0)


def parallel(steps: int) -> dict:
    out = {}
    ctx = mp.get_context("spawn")
    for d in (96, 128):
        with ctx.Pool(1) as pool:
            one = pool.map(_solo, [(d, steps)])[0]
        with ctx.Pool(2) as pool:
            two = pool.map(_solo, [(d, steps)] * 2)
        out[f"d{d}_1thr_alone"] = one
        out[f"d{d}_2x1thr_parallel_total"] = sum(two)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = {"in_process": in_process(a.steps), "processes": parallel(a.steps * 2)}
    for k, v in res["in_process"].items():
        print(f"{k:22s} {v['tokens_per_s'] / 1e3:6.1f}k tok/s  x{v['ratio_to_fp32']:.2f} vs fp32")
    for k, v in res["processes"].items():
        print(f"{k:28s} {v / 1e3:6.1f}k tok/s")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
