"""Training throughput: our trainer loop vs a minimal plain-PyTorch loop, side by side.

* ``trainer``: ``interventions.zoo.train.train`` on the attn-2l preset (byte-level stdlib corpus, batch
  16 x 256, AdamW, clipping 1.0, SDPA attention), N2 steps. Step time = the median interval between
  consecutive steps, stamped at each step's gradient clipping (the same point of every step, data
  loading included), after N1 warm-up steps. This leaves out the run's fixed costs (corpus load,
  step-0 evaluation, checkpoints: log-spaced, 48 per run, a few percent of a real run). An earlier
  version differenced two runs of N1 and N2 steps; the fixed costs' run-to-run noise (page cache,
  reading the corpus for its fingerprint) biased that by 5-10% against the trainer.
* ``plain``: the same model, batch shape, AdamW groups and clipping in a bare loop over batches
  fetched beforehand (no data loading), N2 - N1 steps.
* ``plain_fused``: as ``plain`` with ``AdamW(fused=True)`` (CPU fused kernels exist since torch 2.4).
  The trainer uses fused AdamW on CUDA only, so on CUDA it is held to ``plain_fused`` (the same
  optimizer; ``trainer_baseline`` in the output), on the CPU to ``plain``.
* ``plain_compiled`` (``--compile``): as ``plain`` with ``torch.compile(model)``.
Also: the share of the trainer's step time spent fetching batches (``source.train_batch``).
Target: trainer tokens/s >= 0.95 x that baseline.

    python benchmarks/bench_train.py --device cpu --out results/bench/train.json
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from _common import base_parser, finish, machine, med, sync

import torch
import torch.nn.functional as F


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n1", type=int, default=4, help="warm-up steps left out of the median")
    p.add_argument("--n2", type=int, default=None, help="steps run (default 24 on CPU, 204 on CUDA)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) in the plain loop")
    args = p.parse_args(argv)
    from experiments.presets import get_preset
    from interventions.zoo import train as T

    reps = args.reps or 3
    n1 = args.n1
    n2 = args.n2 or (24 if args.device == "cpu" else 204)
    steps = n2 - n1
    d = get_preset("attn-2l")
    d.update(tokens=10 ** 10, n_checkpoints=1, n_eval_windows=16, device=args.device)
    cfg = T.TrainConfig.from_dict(d)
    source, tok, _ = T.build_source(cfg)  # builds the corpus cache once, outside the timings
    vocab = len(tok)
    tokens_per_step = cfg.batch_size * cfg.n_ctx
    batches = [source.train_batch(s, cfg.batch_size, cfg.n_ctx, cfg.seed).to(args.device) for s in range(steps)]
    tmp = tempfile.mkdtemp(prefix="bench_train_")

    stamps: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def stamped_clip(*a, **k):  # called once per step, by the trainer and by the plain loop alike
        sync(args.device)
        stamps.append(time.perf_counter())
        return real_clip(*a, **k)

    torch.nn.utils.clip_grad_norm_ = stamped_clip

    def median_step(skip: int) -> float:
        gaps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:])]
        return med(gaps)

    def trainer():
        run = os.path.join(tmp, f"run{time.perf_counter_ns()}")
        stamps.clear()
        T.train(cfg, run, progress=False, stop_after_steps=n2)
        shutil.rmtree(run, ignore_errors=True)
        return median_step(n1) * steps

    def plain(fused=False, compiled=False):
        torch.manual_seed(cfg.seed)
        model = T.AttnOnlyForCausalLM(T.AttnOnlyConfig(**cfg.model, vocab_size=vocab)).to(args.device).train()
        decay = [q for q in model.parameters() if q.dim() >= 2]
        no_decay = [q for q in model.parameters() if q.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                                fused=True if fused else None)
        fwd = torch.compile(model) if compiled else model

        def step(x):
            logits = fwd(x).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            return loss.item()

        for x in batches[:2]:  # warm-up (compilation, allocator)
            step(x)
        stamps.clear()
        for x in batches:
            step(x)
        return median_step(n1) * steps  # same measure as the trainer's: median step x steps

    def data():
        t = time.perf_counter()
        for s in range(steps):
            source.train_batch(s, cfg.batch_size, cfg.n_ctx, cfg.seed).to(args.device)
        sync(args.device)
        return time.perf_counter() - t

    names = ["trainer", "plain", "plain_fused"] + (["plain_compiled"] if args.compile else [])
    times = {k: [] for k in names + ["data"]}
    trainer()  # warm-up: first-call costs (imports, thread pools)
    for _ in range(reps):
        times["trainer"].append(trainer())
        times["plain"].append(plain())
        times["plain_fused"].append(plain(fused=True))
        if args.compile:
            times["plain_compiled"].append(plain(compiled=True))
        times["data"].append(data())
    shutil.rmtree(tmp, ignore_errors=True)
    torch.nn.utils.clip_grad_norm_ = real_clip
    s = {k: med(v) for k, v in times.items()}
    tps = {k: steps * tokens_per_step / s[k] for k in names}
    # the trainer's own optimizer (zoo.train: fused AdamW on CUDA only) is the baseline it is held to, so
    # that the same work is compared (fused AdamW alone is ~11% faster on a GPU)
    baseline = "plain_fused" if args.device.startswith("cuda") else "plain"
    result = {"benchmark": "train", "machine": machine(args.device), "preset": "attn-2l", "batch": cfg.batch_size,
              "n_ctx": cfg.n_ctx, "steps_timed": steps, "reps": reps, "seconds": s, "all_seconds": times,
              "tokens_per_s": tps, "trainer_baseline": baseline,
              "trainer_over_plain": tps["trainer"] / tps[baseline],
              "plain_fused_over_plain": tps["plain_fused"] / tps["plain"],
              "data_share_of_trainer_step": s["data"] / s["trainer"]}
    if args.compile:
        result["plain_compiled_over_plain"] = tps["plain_compiled"] / tps["plain"]
    print("[train] " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
          + f"; trainer/{baseline} {result['trainer_over_plain']:.3f}x; fused/plain {result['plain_fused_over_plain']:.3f}x"
          + f"; data share {result['data_share_of_trainer_step']:.1%}", flush=True)
    return finish(result, args.out)


if __name__ == "__main__":
    main()
