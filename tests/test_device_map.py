"""Models dispatched with an accelerate device map: every primitive equals the single-device run, and a
map that leaves layers on the meta device is refused before any work.

Here every module sits on the CPU with accelerate's hooks installed (``force_hooks=True``: an all-CPU
map installs none otherwise); ``benchmarks/check_device_map.py`` runs the same checks with layers
split between cuda:0 and the CPU where a GPU is present."""

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_device_map.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_device_map", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_every_primitive_on_a_hooked_cpu_map_equals_the_plain_model(capsys):
    """The check script on a CPU-only map (GPT-2 and Llama-GQA, accelerate hooks on every module):
    per-token loss under every ablation kind, sweeps, patching, path patching, caching of every site,
    ``execute`` with prefix/attn_outputs and head scores equal the unhooked model's, each result on one
    device; without a GPU the split map says "skipped cuda" and the script exits 0."""
    code = _script().main([])
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert code == 0, out
    assert summary["ok"] and summary["cpu"]["ok"] and summary["refusal"]["disk_offload"]["ok"]
    for arch in ("gpt2", "llama"):
        res = summary["cpu"][arch]
        assert res["accelerate_hooks"], "the map installed no hooks: the check would not exercise them"
        assert len([k for k, v in res.items() if isinstance(v, dict) and "ok" in v]) >= 20
    if not torch.cuda.is_available():
        assert summary["split"].startswith("skipped cuda")
        assert summary["refusal"]["from_pretrained_cpu_entries"].startswith("skipped cuda")


def _offloaded(tmp_path):
    """A tiny GPT-2 with layer 1 offloaded to disk by its device map (its parameters on meta)."""
    from accelerate import dispatch_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=30, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    dmap = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
            "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dispatch_model(model, dmap, offload_dir=str(tmp_path / "offload"))


def test_a_layer_on_the_meta_device_is_refused_before_any_work(tmp_path):
    """Every primitive on a model whose device map offloads a layer (or one never loaded) raises
    ValueError naming the meta device, the modules and the fix, before any forward pass."""
    import interventions as iv
    from accelerate import init_empty_weights
    from interventions.engine.tracing import Run, execute
    from interventions.primitives.patching import patch_residual

    model = _offloaded(tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters())
    with init_empty_weights():
        empty = type(model)(model.config)
    tokens = torch.randint(1, 30, (2, 6))
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    metric = iv.mean_loss_metric
    for m, where in ((model, "transformer.h.1"), (empty, "lm_head")):
        for run in (lambda: iv.per_token_loss(m, tokens, iv.MeanAblation("L0H0", tokens)),
                    lambda: iv.ablation_sweep(m, tokens, "pattern"),
                    lambda: iv.patch_heads(m, tokens, tokens, metric),
                    lambda: patch_residual(m, tokens, tokens, metric),
                    lambda: iv.path_patch(m, tokens, tokens, metric, "L0H0", "L1H1"),
                    lambda: iv.run_with_cache(m, tokens, ["L0.z"]),
                    lambda: execute(m, Run(tokens)),
                    lambda: iv.head_scores(m, n_examples=2, seq_len=5, prefix_tokens=3, bos_id=0)):
            with pytest.raises(ValueError, match=rf"meta device \({where}.*dispatch_model\(model, device_map, "
                                                 r"main_device='cpu'\)"):
                run()
    assert not calls



def test_meta_parameters_are_seen_on_every_call():
    """The meta-device check reads every parameter on every call: a weight replaced by a meta tensor, a
    module with meta weights added, or the whole model moved to meta after a first call is refused on
    the next call (before any forward), and the model runs again once fixed."""
    from torch import nn

    import interventions as iv

    torch.manual_seed(0)
    model = iv.AttnOnlyForCausalLM(iv.AttnOnlyConfig(n_layers=2, n_heads=2, d_model=16, vocab_size=20)).eval()
    tokens = torch.randint(0, 20, (2, 5))
    want = iv.run_with_ablations(model, tokens, iv.ZeroAblation("L1H0"))
    attn = model.transformer.h[1].attn
    weight = attn.c_proj.weight
    attn.c_proj.weight = nn.Parameter(torch.empty_like(weight, device="meta"))
    with pytest.raises(ValueError, match=r"meta device \(transformer\.h\.1\.attn\.c_proj\)"):
        iv.run_with_ablations(model, tokens, iv.ZeroAblation("L1H0"))
    attn.c_proj.weight = weight
    torch.testing.assert_close(iv.run_with_ablations(model, tokens, iv.ZeroAblation("L1H0")), want, atol=0, rtol=0)
    attn.extra = nn.Linear(2, 2, device="meta")  # a module added since
    with pytest.raises(ValueError, match=r"meta device \(transformer\.h\.1\.attn\.extra\)"):
        iv.run_with_ablations(model, tokens, iv.ZeroAblation("L1H0"))
    del attn.extra
    torch.testing.assert_close(iv.run_with_ablations(model, tokens, iv.ZeroAblation("L1H0")), want, atol=0, rtol=0)
    model.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        iv.run_with_ablations(model, tokens, iv.ZeroAblation("L1H0"))


def test_a_buffer_on_the_meta_device_is_refused():
    """A buffer left on the meta device (e.g. a non-persistent rotary ``inv_freq`` after building on meta and
    ``load_state_dict(assign=True)``) is refused like a parameter, naming its module, before any forward
    (it crashed inside the forward with "Cannot copy out of meta tensor")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import interventions as iv

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         hidden_size=16, intermediate_size=32, vocab_size=30,
                                         max_position_embeddings=16)).eval()
    tokens = torch.randint(0, 30, (2, 5))
    want = iv.per_token_loss(model, tokens)
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq
    rotary.inv_freq = inv_freq.to("meta")
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"meta device \(model\.rotary_emb\).*dispatch_model"):
        iv.per_token_loss(model, tokens)
    assert not calls
    hook.remove()
    rotary.inv_freq = inv_freq
    torch.testing.assert_close(iv.per_token_loss(model, tokens), want, atol=0, rtol=0)
