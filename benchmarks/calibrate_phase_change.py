"""Calibration: train a grid of small configs in parallel and record when the phase change comes.

Used to pick the presets' defaults (docs/calibration.md, "Choosing the defaults"). Each grid entry is a
TrainConfig dict; runs go in parallel processes; the metrics of all runs are gathered into one JSON.

    python benchmarks/calibrate_phase_change.py grid.json out_dir --device cuda --parallel 8
"""

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run(args):
    name, cfg_dict, out_dir, max_seconds, threads = args
    import torch

    torch.set_num_threads(threads)
    from interventions.zoo.train import TrainConfig, read_metrics, train

    cfg = TrainConfig.from_dict(cfg_dict)
    run_dir = Path(out_dir) / name
    t0 = time.time()
    try:
        train(cfg, run_dir, progress=False, resume=(run_dir / "train_config.json").is_file())
        err = None
    except Exception as e:  # record and continue the grid
        err = f"{type(e).__name__}: {e}"
    return name, {"config": cfg_dict, "seconds": time.time() - t0, "error": err,
                  "metrics": read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("grid")
    ap.add_argument("out")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1 per core scales best)")
    a = ap.parse_args()
    grid = json.loads(Path(a.grid).read_text())
    for cfg in grid.values():
        cfg["device"] = a.device
    # Tokenise once before the parallel runs share the cache.
    from interventions.zoo.train import TrainConfig, build_source

    for cfg in grid.values():
        build_source(TrainConfig.from_dict(cfg))
    jobs = [(name, cfg, a.out, a.max_seconds, a.threads) for name, cfg in grid.items()]
    results = {}
    with mp.get_context("spawn").Pool(a.parallel) as pool:
        for name, res in pool.imap_unordered(_run, jobs):
            results[name] = res
            print(name, f"{res['seconds']:.0f}s", res["error"] or "", flush=True)
            for m in res["metrics"][::4] + res["metrics"][-1:]:
                print(f"  {m['tokens']/1e6:8.2f}M val {m['val_loss']:.3f} icl {m['icl_score']:+.3f} "
                      f"rep2 {m['repeat_loss_second']:.3f}", flush=True)
            Path(a.out, "calibration.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
