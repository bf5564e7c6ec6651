"""Every primitive on a model split across devices equals the single-device run.

Builds a small GPT-2 and a small Llama with grouped-query attention from configs (random weights,
untied unembedding so it can sit on its own device), and for each device map runs every primitive
on the dispatched model and on an undispatched copy on the CPU (one device, no hooks): per-token loss
under zero / mean / resample / function / pattern-preserving ablation (also on a left-padded batch),
``ablation_sweep`` (zero, mean, resample, pattern; with and without the skipped-attention shortcut),
head / residual / pattern patching, path patching, caching of every site, ``execute`` with
``Run.prefix`` and ``Run.attn_outputs``, and ``head_scores``. Each result must match to float
tolerance and come back on one device (logits and caches: the model's first parameter's device;
reduced results: the CPU). A map that leaves layers on the meta device must be refused before any
forward pass.

Maps (``--maps``, default: all):
  cpu      every module on the CPU, with accelerate's hooks installed (``dispatch_model(...,
           force_hooks=True)``; without it an all-CPU map installs none)
  split    embeddings and layers 0 and 2 on cuda:0, layer 1 and the final norm on the CPU, the
           unembedding on cuda:0 (``dispatch_model(..., main_device="cpu")``, so CPU layers run on the
           CPU); "skipped cuda" without a GPU
  refusal  a layer offloaded to disk (any machine), and on a GPU ``from_pretrained(device_map=...)``
           with CPU entries (accelerate offloads those to the meta device): ValueError, no forward

Prints one JSON summary; exit code 0 when every check that ran passed.

    python benchmarks/check_device_map.py
    python benchmarks/check_device_map.py --maps cpu --out results/device_map_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere, installed or not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VOCAB, POS, LAYERS = 40, 12, 3
RTOL, ATOL = 1e-4, 1e-4  # float32 on two devices: kernels differ in summation order only
SCORE_ATOL = 1e-3  # head scores go through softmax averages and eigenvalues


def build(arch: str):
    """A 3-layer model of ``arch`` ("gpt2" or "llama": 4 query heads, 2 key/value heads), seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=LAYERS, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                         eos_token_id=0, tie_word_embeddings=False)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def device_map(arch: str, split: bool) -> dict[str, str]:
    """Module -> device. ``split``: embeddings, layers 0 and 2 and the unembedding on cuda:0, layer 1
    and the final norm on the CPU, so activations cross devices at every boundary."""
    gpu = "cuda:0" if split else "cpu"
    base, embeds, norm = (("transformer", ["wte", "wpe", "drop"], "ln_f") if arch == "gpt2"
                          else ("model", ["embed_tokens", "rotary_emb"], "norm"))
    m = {f"{base}.{e}": gpu for e in embeds}
    m.update({f"{base}.{('h' if arch == 'gpt2' else 'layers')}.{i}": (gpu if i % 2 == 0 else "cpu")
              for i in range(LAYERS)})
    m[f"{base}.{norm}"] = "cpu"
    m["lm_head"] = gpu
    return m


def dispatched(model, dmap: dict[str, str]):
    from accelerate import dispatch_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dispatch_model(copy.deepcopy(model), dmap, main_device="cpu", force_hooks=True)


def checks(tokens: torch.Tensor, corrupted: torch.Tensor, single):
    """name -> (function of a model returning a tensor or a dict of tensors, where the result lives:
    "model" = the model's first parameter's device, "cpu", or None for tables). ``single``: the
    single-device model, whose cached activations some checks feed to the model under test."""
    import interventions as iv
    from interventions.engine.tracing import Run, execute
    from interventions.primitives import sweep as sweep_mod
    from interventions.primitives.patching import patch_patterns, patch_residual

    mask = torch.ones_like(tokens)
    mask[0, :4] = 0  # row 0 left-padded
    padded = tokens.clone()
    padded[0, :4] = 0
    sites = [f"L{layer}.{k}" for layer in range(LAYERS) for k in
             ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "mlp_out", "resid_post")] + ["final"]

    def loss(abl, toks=tokens, m=None):
        return lambda model: iv.per_token_loss(model, toks, abl, attention_mask=m)

    def sweep(kind, shortcut=True, m=None, per_pass=3):
        def run(model):
            old, sweep_mod._ATTN_SHORTCUT = sweep_mod._ATTN_SHORTCUT, shortcut
            try:
                clean, delta = iv.ablation_sweep(model, padded if m is not None else tokens, kind,
                                                 heads_per_pass=per_pass, attention_mask=m)
            finally:
                sweep_mod._ATTN_SHORTCUT = old
            return {"clean": clean, "delta": delta}
        return run

    def cache(model):
        with iv.observable(model):
            logits, acts = iv.run_with_cache(model, tokens, sites)
        return {"logits": logits, **acts}

    def engine_skips(model):
        # prefix (a skipped block's output) and attn_outputs (a skipped attention's output) from a
        # plain CPU cache, fed to the model on whatever device its layers are
        _, acts = iv.run_with_cache(single, tokens, ["L2.resid_pre", "L1.resid_pre", "L1.attn_out"])
        a = execute(model, Run(tokens, start=2, prefix=acts["L2.resid_pre"], reads=["L2.z"]))
        b = execute(model, Run(tokens, start=1, prefix=acts["L1.resid_pre"],
                               attn_outputs={1: 2 * acts["L1.attn_out"]}, reads=["L1.resid_post"]))
        return {"prefix_logits": a.logits, "prefix_z": a.acts["L2.z"], "attn_logits": b.logits,
                "attn_resid": b.acts["L1.resid_post"]}

    def scores(model):
        df = iv.head_scores(model, n_examples=3, seq_len=10, prefix_tokens=5, bos_id=0, vocab_range=(1, VOCAB),
                            exclude_top=0.0)
        return torch.tensor(df.drop(columns=["layer", "head"]).to_numpy(dtype=float))

    metric = iv.mean_loss_metric
    return {
        "logits": (lambda model: iv.run_with_ablations(model, tokens), "model"),
        "loss_clean": (loss(None), "cpu"),
        "loss_zero": (loss(iv.ZeroAblation(["L1H2", "L2H0"])), "cpu"),
        "loss_mean": (loss(iv.MeanAblation("L1H1", corrupted)), "cpu"),
        "loss_resample": (loss(iv.ResampleAblation("L2H3", corrupted, seed=1)), "cpu"),
        "loss_function": (loss(iv.FunctionAblation("L0H0", lambda z, head: 0.5 * z)), "cpu"),
        "loss_pattern_preserving": (loss(iv.PatternPreserving(iv.ZeroAblation("L1H0"))), "cpu"),
        "loss_padded_mean": (loss(iv.MeanAblation("L1H1", corrupted), padded, mask), "cpu"),
        "sweep_zero": (sweep("zero"), "cpu"),
        "sweep_zero_no_shortcut": (sweep("zero", shortcut=False), "cpu"),
        # the default pass size: on a GPU-first model a small sweep may run as one pass of every head
        "sweep_zero_default_pass": (sweep("zero", per_pass=None), "cpu"),
        "sweep_mean": (sweep("mean"), "cpu"),
        "sweep_resample": (sweep("resample"), "cpu"),
        "sweep_pattern": (sweep("pattern"), "cpu"),
        "sweep_pattern_no_shortcut": (sweep("pattern", shortcut=False), "cpu"),
        "sweep_padded_zero": (sweep("zero", m=mask), "cpu"),
        "patch_heads_z": (lambda model: iv.patch_heads(model, tokens, corrupted, metric), "cpu"),
        "patch_heads_z_by_pos": (lambda model: iv.patch_heads(model, tokens, corrupted, metric, by="head_pos"), "cpu"),
        "patch_heads_k": (lambda model: iv.patch_heads(model, tokens, corrupted, metric, site="k"), "cpu"),
        "patch_residual": (lambda model: patch_residual(model, tokens, corrupted, metric), "cpu"),
        "patch_patterns": (lambda model: patch_patterns(model, tokens, corrupted, metric), "cpu"),
        "path_patch_k": (lambda model: iv.path_patch(model, tokens, corrupted, metric, ["L0H1", "L1H2"],
                                                     ["L2H0", "L2H3"], "k"), "cpu"),
        "path_patch_q": (lambda model: iv.path_patch(model, tokens, corrupted, metric, ["L0H0"], ["L1H1", "L2H2"],
                                                     "q"), "cpu"),
        "cache_every_site": (cache, "model"),
        "execute_prefix_and_attn_outputs": (engine_skips, "model"),
        "head_scores": (scores, None),
    }


def _as_dict(x) -> dict[str, torch.Tensor]:
    return x if isinstance(x, dict) else {"": x}


def compare(name: str, fn, where, ref_model, model) -> dict:
    from interventions.engine.devices import output_device

    try:
        want, got = _as_dict(fn(ref_model)), _as_dict(fn(model))
    except Exception as e:  # one failing check must not hide the others
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
    expect = {"model": output_device(model), "cpu": torch.device("cpu"), None: torch.device("cpu")}[where]
    devices = sorted({str(t.device) for t in got.values()})
    diff, ok = 0.0, devices == [str(expect)]
    tol = SCORE_ATOL if name == "head_scores" else ATOL
    for key, w in want.items():
        g = got[key].detach().cpu().double()
        w = w.detach().cpu().double()
        if g.shape != w.shape or not torch.equal(g.isnan(), w.isnan()):
            ok = False
            continue
        d = (g - w).nan_to_num().abs()
        diff = max(diff, float(d.max()) if d.numel() else 0.0)
        ok &= bool(torch.allclose(g, w, rtol=RTOL, atol=tol, equal_nan=True))
    return {"ok": ok, "max_abs_diff": diff, "devices": devices, "expected_device": str(expect)}


def check_map(kind: str) -> dict:
    """Every check on GPT-2 and Llama-GQA dispatched by the ``kind`` ("cpu" or "split") map."""
    out = {}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (3, POS), generator=g)
    corrupted = torch.randint(1, VOCAB, (3, POS), generator=g)
    for arch in ("gpt2", "llama"):
        ref = build(arch)
        dmap = device_map(arch, split=kind == "split")
        model = dispatched(ref, dmap)
        hooked = hasattr(model.lm_head, "_hf_hook")
        res = {"device_map": dmap, "accelerate_hooks": hooked}
        for name, (fn, where) in checks(tokens, corrupted, ref).items():
            res[name] = compare(name, fn, where, ref, model)
        res["ok"] = hooked and all(r["ok"] for r in res.values() if isinstance(r, dict) and "ok" in r)
        out[arch] = res
    out["ok"] = all(r["ok"] for r in out.values())
    return out


def _refused(model, tokens) -> dict:
    """A primitive on ``model`` must raise ValueError naming the meta device, before any forward."""
    import interventions as iv

    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        iv.per_token_loss(model, tokens)
    except ValueError as e:
        return {"ok": "meta device" in str(e) and not calls, "error": str(e), "forwards_before_error": len(calls)}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        handle.remove()
    return {"ok": False, "error": "no error raised"}


def check_refusals(cuda: bool) -> dict:
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(1, VOCAB, (2, POS))
    out = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build("gpt2")
        dmap = device_map("gpt2", split=False)
        dmap["transformer.h.1"] = "disk"
        out["disk_offload"] = _refused(dispatch_model(model, dmap, offload_dir=f"{tmp}/offload"), tokens)
        if cuda:
            build("llama").save_pretrained(f"{tmp}/llama")
            m = AutoModelForCausalLM.from_pretrained(f"{tmp}/llama", device_map=device_map("llama", split=True))
            meta = any(p.device.type == "meta" for p in m.parameters())
            out["from_pretrained_cpu_entries"] = {**_refused(m, tokens), "meta_params": meta} if meta else {
                "ok": True, "note": "from_pretrained kept CPU layers on the CPU (no meta params): not refused"}
        else:
            out["from_pretrained_cpu_entries"] = "skipped cuda (no GPU)"
    out["ok"] = all(r["ok"] for r in out.values() if isinstance(r, dict))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", nargs="+", default=["cpu", "split", "refusal"], choices=["cpu", "split", "refusal"])
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both devices
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available()
    summary: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None}
    for kind in args.maps:
        if kind == "refusal":
            summary[kind] = check_refusals(cuda)
        elif kind == "split" and not cuda:
            summary[kind] = "skipped cuda (no GPU)"
        else:
            summary[kind] = check_map(kind)
    ran = [v for v in summary.values() if isinstance(v, dict)]
    summary["ok"] = all(v["ok"] for v in ran)
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
