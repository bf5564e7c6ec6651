"""Shared helpers of the benchmark scripts: side-by-side timing, machine facts, JSON output.

Timings are medians over repetitions in which the compared variants are *interleaved* (A B C A B C ...),
so a busy shared machine slows every variant alike and the ratios stay meaningful."""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere, installed or not (the GPU box has no install)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def optional(name: str):
    """The module, or None when it is not importable (the GPU box may lack nnsight / transformer-lens)."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install
        return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(variants: dict, reps: int, device: str, warmup: int = 1,
                shuffle: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``reps`` rounds, variants interleaved within a round.

    ``shuffle``: each round runs the variants in a fresh random order (seeded), so no variant always
    follows the same one (what the previous call leaves in the caches then biases no variant)."""
    import random

    rng = random.Random(0)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    order = list(variants.items())
    for _ in range(reps):
        if shuffle:
            rng.shuffle(order)
        for name, fn in order:
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def machine(device: str) -> dict:
    """What ran the benchmark, and how busy the machine was (load average) when it started."""
    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    for mod in ("transformers", "nnsight", "transformer_lens"):
        m = optional(mod)
        info[mod] = getattr(m, "__version__", "present") if m is not None else None
    return info


def finish(result: dict, out: str | None) -> dict:
    try:
        result.setdefault("machine", {})["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=str))
    return result


def base_parser(description: str):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (median reported)")
    return p


def trace_parser(doc: str):
    """``base_parser`` plus the --batch / --pos of one trace's input (8 x 256 by default)."""
    p = base_parser(doc.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pos", type=int, default=256)
    return p


def attn2l(device: str):
    """The attn-2l preset's model (d_model 96, 4 heads, ctx 256, vocab 257), random weights."""
    from experiments.presets import get_preset
    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM

    p = get_preset("attn-2l")
    torch.manual_seed(0)
    return AttnOnlyForCausalLM(AttnOnlyConfig(**p["model"], vocab_size=p["vocab_size"])).to(device).eval()


def gpt2_small(device: str, n_layer: int = 4):
    """A GPT-2-architecture model: n_layer x 4 heads, d_model 128, ctx 256, vocab 257, random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_head=4, n_embd=128, n_positions=256, vocab_size=257,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(device).eval()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth_mib(fn) -> float:
    """Peak growth of the resident set (MiB) while ``fn`` runs: /proc/self/statm sampled every 0.5 ms by a
    thread (Linux). torch's CPU allocations are invisible to tracemalloc, and ru_maxrss is a high-water
    mark that earlier imports may already have raised; run it in a fresh process for a clean baseline."""
    import threading

    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return (peak[0] - base) / 2 ** 20
