"""Remote execution through nnsight's remote backend, tested offline with ``remote="local"``.

Every remote-capable primitive gives the same numbers through ``remote="local"`` as locally, on a small
GPT-2 and a small Llama with grouped-query attention built from configs; what cannot run remotely is
refused before anything is sent. No test makes a network call (sockets are blocked).

nnsight's ``LocalSimulationBackend`` is lenient in ways that a server is not, so these tests run a
stricter version of it (``strict_call``): (1) it hides uninstalled modules while deserialising, but an
installed package (site-packages, or an editable install's import hook, as in CI) is found again, so a
trace body that needs ``interventions`` would pass it and fail on NDIF; here the request may only
reference the modules NDIF lets a request unpickle, and importing this package fails; (2) it executes
the caller's original objects, so a container made before the trace and filled inside comes back
filled; here the deserialised copy runs, as on a server, and only saved values come back (through
``torch.save``, as a server's result does); (3) it runs the body with every builtin; here only the
builtins NDIF's sandbox whitelists. The whitelists are NDIF's (ndif-team/ndif,
``src/ndif/services/ray/nn/security/whitelist.yaml``, module roots and builtins as read there).
"""

import importlib.abc
import io
import linecache
import re
import socket
import sys
import warnings
from dataclasses import replace

import pytest
import torch

import interventions as iv
from interventions.engine.adapters import ARCHS, module_at
from interventions.engine.remote import NotRemotable
from interventions.engine.tracing import Engine, Read, Run, Write, compact, execute
from interventions.primitives.ablation import Ablation
from interventions.primitives.cache import cache_activations
from interventions.primitives.patching import logit_diff, patch_patterns, patch_residual

VOCAB = 50


# ----------------------------------------------------------------------------- a server, simulated strictly

# Roots of the modules NDIF lets a request unpickle (its deserialization modules and its import whitelist).
SERVER_MODULES = {
    "pickle", "cloudpickle", "copyreg", "nnsight", "transformers", "transformers_modules", "PIL", "re",
    "dataclasses", "builtins", "torch", "collections", "time", "numpy", "sympy", "nnterp", "math", "einops",
    "urllib3", "typing", "_operator", "operator", "pandas", "enum", "__future__", "diffusers", "tqdm", "heapq",
    "json", "warnings", "functools", "_functools", "jinja2", "encodings", "peft", "pydantic", "argparse",
    "datasets", "tokenizers", "huggingface_hub", "httpcore", "fsspec", "scipy", "regex", "concurrent", "io",
    "_frozen_importlib_external", "_frozen_importlib"}
# The builtins NDIF's sandbox leaves to a request's code (its whitelist, minus the exceptions: all kept).
SERVER_BUILTINS = {
    "abs", "aiter", "all", "anext", "any", "ascii", "bool", "bytearray", "bytes", "callable", "chr", "classmethod",
    "complex", "delattr", "dict", "dir", "divmod", "enumerate", "filter", "float", "format", "frozenset",
    "getattr", "hasattr", "hash", "hex", "id", "int", "isinstance", "issubclass", "iter", "len", "list", "map",
    "max", "min", "next", "object", "oct", "ord", "pow", "print", "property", "range", "repr", "reversed", "round",
    "set", "setattr", "slice", "sorted", "staticmethod", "str", "sum", "super", "tuple", "type", "vars", "zip",
    "memoryview", "globals", "eval", "compile", "exec", "open", "None", "True", "False", "Ellipsis",
    "NotImplemented", "__import__", "__build_class__", "__name__", "__doc__"}


def _server_unpickler():
    from nnsight.intervention.serialization import CustomCloudUnpickler

    def allowed(module: str) -> str:
        if module.split(".")[0] not in SERVER_MODULES:
            raise ModuleNotFoundError(f"the server does not let a request load {module!r}")
        return module

    class ServerUnpickler(CustomCloudUnpickler):
        def find_class(self, module, name):
            found = super().find_class(allowed(module), name)
            if (module, name) == ("cloudpickle.cloudpickle", "subimport"):
                return lambda mod: found(allowed(mod))
            return found

    return ServerUnpickler


class _NotOnServer(importlib.abc.MetaPathFinder):
    """Import hook: modules of these packages are not installed on the server."""

    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the server)")
        return None


def strict_call(backend, tracer, sent: list) -> None:
    """``LocalSimulationBackend.__call__`` as strict as a server (module docstring)."""
    from nnsight.ndif import pull_env
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import mark
    from nnsight.tracing.util import push

    pull_env()
    blob = RequestModel.serialize(tracer, compress=False)
    sent.append(len(blob))
    persistent = backend.model._remoteable_persistent_objects()
    filename = tracer.info.frame.f_code.co_filename
    line = linecache.cache.get(filename)
    hidden = backend._hide_local_modules()
    blocker = _NotOnServer({"interventions", "tests"})
    sys.meta_path.insert(0, blocker)
    try:
        restored = RequestModel.deserialize(blob, persistent, compress=False, unpickler=_server_unpickler())
    finally:
        sys.meta_path.remove(blocker)
        backend._restore(hidden)
        if line is not None:
            linecache.cache[filename] = line
        else:
            linecache.cache.pop(filename, None)
    frame = restored.info.frame  # the shipped names only
    import builtins

    # the body runs in a scope made from these names: its builtins are the ones it finds here
    frame.f_locals["__builtins__"] = {k: v for k, v in vars(builtins).items()
                                      if k in SERVER_BUILTINS or (isinstance(v, type) and issubclass(v, BaseException))}
    before = dict(frame.f_locals)
    restored.execute(restored.info.code)
    result = {k: v for k, v in frame.f_locals.items() if k not in before or before[k] is not v}
    buffer = io.BytesIO()
    torch.save(result, buffer)
    buffer.seek(0)
    result = torch.load(buffer, weights_only=False)
    for value in result.values():
        mark(value)
    push(tracer.info.frame, result)


@pytest.fixture(autouse=True)
def server(monkeypatch):
    """Every remote="local" trace goes through ``strict_call``; returns the list of request sizes
    (one per job sent). Sockets are blocked: a network call fails the test."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.backends.remote import RemoteBackend

    sent: list[int] = []
    monkeypatch.setattr(LocalSimulationBackend, "__call__", lambda self, tracer: strict_call(self, tracer, sent))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(RemoteBackend, "__call__", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return sent


# ----------------------------------------------------------------------------- models

def tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t0")


def build(arch: str):
    """(HF model, its nnsight wrapper): GPT-2 as LanguageModel, Llama-GQA as TransformersModel."""
    import nnsight
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=32,
                                           bos_token_id=0, eos_token_id=0)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # LanguageModel: the name most users know
            return model, nnsight.LanguageModel(model, tokenizer=tiny_tokenizer())
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         hidden_size=32, intermediate_size=64, vocab_size=VOCAB,
                                         max_position_embeddings=32, bos_token_id=0, eos_token_id=0)).eval()
    return model, nnsight.TransformersModel(model, tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    return build(request.param)


def close(remote, local):
    torch.testing.assert_close(remote, local, rtol=1e-6, atol=1e-6, equal_nan=True)


def toks(batch=3, pos=8, seed=1):
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- same numbers remotely

def test_per_token_loss_and_ablations(pair, server):
    """per_token_loss with no, zero, mean and resample ablations (and a padded batch) and
    run_with_ablations give the local numbers through remote="local"; each job went through the
    strict server (the mean/resample reference is one more job)."""
    model, lm = pair
    tokens, ref = toks(), toks(4, 8, seed=2)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    cases = [None, iv.ZeroAblation(["L1H0", "L0H3"]), iv.MeanAblation("L1H2", ref),
             iv.MeanAblation("L0H1", ref, per_position=False), iv.ResampleAblation(["L1H1"], ref, seed=3)]
    for abl in cases:
        n = len(server)
        close(iv.per_token_loss(lm, tokens, abl, remote="local"), iv.per_token_loss(model, tokens, abl))
        assert len(server) == n + 1 + isinstance(abl, (iv.MeanAblation, iv.ResampleAblation))
    close(iv.per_token_loss(lm, tokens, iv.ZeroAblation("L1H1"), attention_mask=mask, batch_size=2, remote="local"),
          iv.per_token_loss(model, tokens, iv.ZeroAblation("L1H1"), attention_mask=mask, batch_size=2))
    abl = [iv.ZeroAblation("L0H0"), iv.ResampleAblation("L1H3", ref, seed=1)]
    close(iv.run_with_ablations(lm, tokens, abl, remote="local"), iv.run_with_ablations(model, tokens, abl))


def test_narrowed_reads_come_back_narrowed(pair, server):
    """A Read's heads and mean over rows are taken on the server: what comes back has the narrowed shape and
    equals the local read; a mean / resample ablation's reference job reads only its heads (and, for a
    mean, only their mean), so a reference over many sequences of a wide model does not travel whole."""
    model, lm = pair
    ref = toks(4, 8, seed=2)
    reads = [Read("L0.z", heads=[2, 0], mean_rows=True), Read("L1.k", heads=[1]), "L1.z"]
    far = Engine(lm, "local").run(Run(ref, reads=reads, returns="none")).acts
    near = Engine(model).run(Run(ref, reads=reads, returns="none")).acts
    d_head = near["L1.z"].shape[-1]
    assert far["L0.z"].shape == (8, 2, d_head) and far["L1.k"].shape == (4, 8, 1, d_head)
    for name in near:
        close(far[name], near[name])
    mean, resample = iv.MeanAblation(["L1H2", "L1H0"], ref), iv.ResampleAblation("L0H3", ref, seed=1)
    for abl in (mean, resample):
        abl.prepare(lm, ref, remote="local")
    assert [tuple(a.shape) for a in mean._acts.values()] == [(8, d_head)] * 2
    assert tuple(resample._acts[iv.Head(0, 3)].shape) == (4, 8, d_head)


def test_ablation_sweep(pair, server):
    """ablation_sweep (zero, mean, resample; several heads per pass; padded) gives the local clean
    loss and deltas through remote="local", one job per pass plus one clean run (the local sweep
    takes its shortcuts, the remote one runs every pass from layer 0: equal to float tolerance)."""
    model, lm = pair
    tokens, ref = toks(), toks(4, 8, seed=2)
    for kind, reference in (("zero", None), ("mean", ref), ("resample", ref)):
        n = len(server)
        clean_r, delta_r = iv.ablation_sweep(lm, tokens, kind=kind, reference=reference, heads_per_pass=3,
                                             remote="local")
        clean, delta = iv.ablation_sweep(model, tokens, kind=kind, reference=reference, heads_per_pass=3)
        torch.testing.assert_close(clean_r, clean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta_r, delta, rtol=1e-5, atol=1e-5)
        assert len(server) == n + 1 + 4 + (kind != "zero")  # clean + 2 layers x ceil(4 / 3) passes (+ reference)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    got = iv.ablation_sweep(lm, tokens, heads=["L1H0", "L0H2"], attention_mask=mask, remote="local")
    want = iv.ablation_sweep(model, tokens, heads=["L1H0", "L0H2"], attention_mask=mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_patching(pair, server):
    """patch_heads (z, q, k and v: per kv head under GQA; by head and by position), patch_residual and
    path_patch give the local numbers through remote="local", with both built-in metrics (reduced on
    the server) and a metric of your own (computed here on the returned logits)."""
    model, lm = pair
    clean, corrupted = toks(2, 6, seed=3), toks(2, 6, seed=4)
    diff = logit_diff(clean[:, -1], corrupted[:, -1])

    def top_logit(logits, tokens):
        return logits[:, -1].max(-1).values

    for metric in (iv.mean_loss_metric, diff, top_logit):
        close(iv.patch_heads(lm, clean, corrupted, metric, remote="local"), iv.patch_heads(model, clean, corrupted, metric))
    for site in ("q", "k", "v"):
        close(iv.patch_heads(lm, clean, corrupted, diff, site=site, heads_per_pass=3, remote="local"),
              iv.patch_heads(model, clean, corrupted, diff, site=site, heads_per_pass=3))
    close(iv.patch_heads(lm, clean, corrupted, iv.mean_loss_metric, by="head_pos", direction="corrupted_to_clean",
                         heads_per_pass=16, remote="local"),
          iv.patch_heads(model, clean, corrupted, iv.mean_loss_metric, by="head_pos", direction="corrupted_to_clean",
                         heads_per_pass=16))
    close(patch_residual(lm, clean, corrupted, diff, remote="local"), patch_residual(model, clean, corrupted, diff))
    for receiver_input in ("q", "k", "v"):
        n = len(server)
        got = iv.path_patch(lm, clean, corrupted, iv.mean_loss_metric, senders=["L0H0", "L0H1", "L0H3"],
                            receivers=["L1H0", "L1H3"], receiver_input=receiver_input, patches_per_pass=4,
                            remote="local")
        want = iv.path_patch(model, clean, corrupted, iv.mean_loss_metric, senders=["L0H0", "L0H1", "L0H3"],
                             receivers=["L1H0", "L1H3"], receiver_input=receiver_input, patches_per_pass=4)
        close(got, want)
        assert len(server) == n + 2 + 1 + 2  # source and target runs, ceil(3 / 4), ceil(6 / 4): as documented



def test_padded_patching(pair, server):
    """On a padded batch (row 0 right-padded, row 1 left-padded: one mask for clean and corrupted)
    patch_heads, patch_residual and path_patch give the local numbers through remote="local", with both
    built-in metrics (logit_diff at each row's last real token, gathered on the server) and a metric of
    one's own given the mask here."""
    model, lm = pair
    clean, corrupted = toks(2, 6, seed=3), toks(2, 6, seed=4)
    mask = torch.ones_like(clean)
    mask[0, -1] = mask[1, :2] = 0
    diff = logit_diff(clean[:, -1], corrupted[:, -1])

    def top_logit(logits, tokens, attention_mask=None):
        last = attention_mask.cumsum(-1).argmax(-1)
        return logits[torch.arange(len(logits)), last].max(-1).values

    for metric in (iv.mean_loss_metric, diff, top_logit):
        close(iv.patch_heads(lm, clean, corrupted, metric, attention_mask=mask, remote="local"),
              iv.patch_heads(model, clean, corrupted, metric, attention_mask=mask))
    close(patch_residual(lm, clean, corrupted, diff, attention_mask=mask, remote="local"),
          patch_residual(model, clean, corrupted, diff, attention_mask=mask))
    close(iv.path_patch(lm, clean, corrupted, iv.mean_loss_metric, ["L0H0", "L0H3"], ["L1H0"], receiver_input="k",
                        attention_mask=mask, remote="local"),
          iv.path_patch(model, clean, corrupted, iv.mean_loss_metric, ["L0H0", "L0H3"], ["L1H0"], receiver_input="k",
                        attention_mask=mask))


def test_caching(pair, server):
    """run_with_cache and cache_activations give the local logits and activations through
    remote="local"; cache_activations does not send the logits back."""
    model, lm = pair
    tokens = toks()
    sites = ["L0.resid_pre", "L0.q", "L0.k", "L0.v", "L0.z", "L0.attn_out", "L1.mlp_out", "L1.resid_post", "final"]
    logits_r, acts_r = iv.run_with_cache(lm, tokens, sites, remote="local")
    logits, acts = iv.run_with_cache(model, tokens, sites)
    close(logits_r, logits)
    assert acts_r.keys() == acts.keys()
    for name in sites:
        close(acts_r[name], acts[name])
    only = cache_activations(lm, tokens, ["L1.z"], remote="local")
    close(only["L1.z"], cache_activations(model, tokens, ["L1.z"])["L1.z"])


def test_engine_skips_and_reductions(pair, server):
    """The engine's skipped blocks and attention modules (start / prefix / attn_outputs, placed on the
    server's device inside the trace) and its reductions (loss, Gather, none) give the local results
    through remote="local"."""
    from interventions.engine.tracing import Gather

    model, lm = pair
    tokens = toks()
    acts = iv.run_with_cache(model, tokens, ["L1.resid_pre", "L1.attn_out"])[1]
    runs = [Run(tokens, reads=["L1.z", "L1.resid_post"], start=1, prefix=acts["L1.resid_pre"], returns="loss"),
            Run(tokens, reads=["L1.mlp_out"], attn_outputs={1: 0.5 * acts["L1.attn_out"]}),
            Run(tokens, writes=[Write("L0.v", None, head=1, pos=2)], returns=Gather(-1, torch.tensor([[3, 4]] * 3))),
            Run(tokens, returns=Gather(torch.tensor([7, 2, -3]), torch.tensor([[3, 4]] * 3))),  # a position per row
            Run(tokens, reads=["L0.k"], writes=[Write("L0.k", torch.ones(3, 8, 8), head=0)], returns="none")]
    for run in runs:
        got, want = execute(lm, run, remote="local"), execute(model, run)
        for field in ("logits", "loss", "gathered"):
            assert (getattr(got, field) is None) == (getattr(want, field) is None)
            if getattr(want, field) is not None:
                close(getattr(got, field), getattr(want, field))
        assert got.acts.keys() == want.acts.keys()
        for name in want.acts:
            close(got.acts[name], want.acts[name])


def test_remote_true_takes_the_same_path(monkeypatch, server):
    """remote=True, with a hub id and an API key (set after nnsight was imported), goes through the
    wrapper's remote backend: here it is swapped for the strict simulation (no network), and gives the
    local numbers; the key reaches nnsight's config."""
    from nnsight import CONFIG
    from nnsight.intervention.backends.local import LocalSimulationBackend

    model, lm = build("gpt2")
    monkeypatch.setattr(lm, "repo_id", "openai-community/gpt2", raising=False)
    monkeypatch.setattr(lm, "args", ("openai-community/gpt2",))  # as made from the hub id
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    asked = []

    def backend(remote, blocking, job_id, verbose):
        asked.append(remote)
        return LocalSimulationBackend(lm)

    monkeypatch.setattr(lm, "_remote_backend", backend, raising=False)
    tokens = toks()
    close(iv.per_token_loss(lm, tokens, iv.ZeroAblation("L1H2"), remote=True),
          iv.per_token_loss(model, tokens, iv.ZeroAblation("L1H2")))
    assert asked == [True] and len(server) == 1 and CONFIG.API.APIKEY == "test-key"


def test_remote_true_leaves_a_meta_model_in_training_mode_alone(monkeypatch, server):
    """nnsight builds a hub-id wrapper's meta model with ``from_config``, in training mode; GPT-2's config
    has dropout. The server runs its own model, so a remote=True run neither switches the local one to
    eval mode nor warns that it does (it warned on every call, telling to call model.eval())."""
    from nnsight import CONFIG
    from nnsight.intervention.backends.local import LocalSimulationBackend

    model, lm = build("gpt2")
    tokens = toks()
    want = iv.per_token_loss(model, tokens, iv.ZeroAblation("L1H2"))
    _, served = build("gpt2")  # the server's copy (the same weights), in eval mode as NDIF loads it
    model.train()  # as the meta model of nnsight.LanguageModel("<hub id>")
    monkeypatch.setattr(lm, "repo_id", "openai-community/gpt2", raising=False)
    monkeypatch.setattr(lm, "args", ("openai-community/gpt2",))
    monkeypatch.setattr(CONFIG.API, "APIKEY", "a-key")
    monkeypatch.setattr(lm, "_remote_backend", lambda *args: LocalSimulationBackend(served), raising=False)
    switched = []
    monkeypatch.setattr(torch.nn.Module, "eval", lambda self: switched.append(self) or self)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = iv.per_token_loss(lm, tokens, iv.ZeroAblation("L1H2"), remote=True)
    assert switched == [] and len(server) == 1 and all(m.training for m in model.modules())
    close(got, want)


# ----------------------------------------------------------------------------- the strict server can fail

def test_strict_server_catches_what_nnsight_simulation_misses(server):
    """The strict simulation fails a trace body that needs this package (not installed on a server)
    or a builtin the server withholds, and returns nothing through a list made before the trace (a
    list made and saved inside comes back): the mistakes the engine's body is written to avoid."""
    import nnsight

    _, lm = build("gpt2")
    tokens = toks()
    with pytest.raises(ModuleNotFoundError, match="interventions"):
        with lm.trace(tokens, remote="local"):
            x = module_at(lm, "lm_head").output.save()
    outside = []
    with lm.trace(tokens, remote="local"):
        outside.append(lm.lm_head.output)
    assert outside == []
    with pytest.raises(NameError, match="locals"):
        with lm.trace(tokens, remote="local"):
            names = locals()  # not a builtin NDIF's sandbox leaves
    with lm.trace(tokens, remote="local"):
        kept = nnsight.save([])
        kept.append(lm.lm_head.output.shape[-1])
    assert kept == [VOCAB]


def test_compact_ships_each_tensor_once():
    """A view is sent as a compact copy (pickling a view ships its whole storage), and one tensor
    used twice stays one object (pickled once)."""
    import pickle

    x = torch.randn(4, 6, 8, 16)
    views = [x[:, :, h] for h in range(8)]
    small = compact(views + [views[0]])
    assert all(torch.equal(a, b) for a, b in zip(small, views + [views[0]]))
    assert small[0] is small[-1]
    assert len(pickle.dumps(small)) < len(pickle.dumps(views)) / 4


# ----------------------------------------------------------------------------- bad input: refused before anything is sent

def test_remote_true_needs_a_hub_id_and_an_api_key(monkeypatch, tmp_path, server):
    """remote=True on a model without a hub id (built from a config, a bare module, a bare nnsight
    wrapper, a local folder), a wrapper of a module loaded here (its hub id is the module's
    name_or_path, but the server would run its own weights: this ran before) or without an API key:
    NotRemotable naming the fix, nothing sent."""
    import nnsight
    from nnsight import CONFIG

    model, lm = build("gpt2")
    tokens = toks()
    monkeypatch.setattr(CONFIG.API, "APIKEY", "a-key")
    with pytest.raises(NotRemotable, match="no hub id.*LanguageModel\\('<hub id>'\\).*remote='local'"):
        iv.per_token_loss(lm, tokens, remote=True)
    with pytest.raises(NotRemotable, match="nnsight.LanguageModel.*got a GPT2LMHeadModel"):
        iv.per_token_loss(model, tokens, remote=True)
    with pytest.raises(NotRemotable, match="bare nnsight.NNsight wrapper, which has no remote="):
        iv.run_with_cache(nnsight.NNsight(model), tokens, ["L0.z"], remote="local")
    monkeypatch.setattr(lm, "repo_id", str(tmp_path), raising=False)
    with pytest.raises(NotRemotable, match="is a local path, not a hub id"):
        iv.patch_heads(lm, tokens, toks(seed=5), iv.mean_loss_metric, remote=True)
    model.name_or_path = "openai-community/gpt2"  # as from_pretrained leaves it: a wrapper takes it as its hub id
    loaded = nnsight.TransformersModel(model, tokenizer=lm.tokenizer)
    assert loaded.repo_id == "openai-community/gpt2"
    with pytest.raises(NotRemotable, match="module loaded here.*not these weights.*"
                                           "LanguageModel\\('openai-community/gpt2'\\).*remote='local'"):
        iv.per_token_loss(loaded, tokens, remote=True)
    monkeypatch.setattr(lm, "repo_id", "openai-community/gpt2", raising=False)
    monkeypatch.setattr(lm, "args", ("openai-community/gpt2",))  # as made from the hub id
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(NotRemotable, match="API key.*login.ndif.us.*NDIF_API_KEY.*set_default_api_key"):
        iv.ablation_sweep(lm, tokens, remote=True)
    with pytest.raises(ValueError, match="remote='yes' is unknown"):
        iv.per_token_loss(lm, tokens, remote="yes")
    assert server == []


def test_what_cannot_run_remotely_says_why_before_sending(server):
    """Pattern-preserving ablation, pattern sites and pattern patching (they edit a shared model),
    functions as written values (they would run on the server): NotRemotable naming why, before any
    job, even when another ablation of the same call would have sent a reference run first."""
    _, lm = build("llama")
    tokens, ref = toks(), toks(4, 8, seed=2)
    frozen = iv.PatternPreserving(iv.ZeroAblation("L1H0"))
    edits = "observable.*a server's model is shared"
    with pytest.raises(NotRemotable, match=edits):
        iv.per_token_loss(lm, tokens, [iv.MeanAblation("L0H0", ref), frozen], remote="local")
    with pytest.raises(NotRemotable, match=edits):
        iv.run_with_ablations(lm, tokens, frozen, remote="local")
    with pytest.raises(NotRemotable, match=edits):
        iv.ablation_sweep(lm, tokens, kind="pattern", remote="local")
    with pytest.raises(NotRemotable, match=edits):
        iv.ablation_sweep(lm, tokens, kind=lambda heads: iv.PatternPreserving(iv.MeanAblation(heads, ref)),
                          remote="local")
    with pytest.raises(NotRemotable, match="observable.*shared"):
        iv.run_with_cache(lm, tokens, ["L0.z", "L1.pattern"], remote="local")
    with pytest.raises(NotRemotable, match="observable.*shared"):
        patch_patterns(lm, tokens, toks(seed=5), iv.mean_loss_metric, remote="local")
    with pytest.raises(ValueError, match="remote='yes' is unknown"):  # named as unknown, as elsewhere
        patch_patterns(lm, tokens, toks(seed=5), iv.mean_loss_metric, remote="yes")
    halved = iv.FunctionAblation("L1H1", lambda z, head: 0.5 * z)
    with pytest.raises(NotRemotable, match="function would run inside the trace on the server"):
        iv.per_token_loss(lm, tokens, [iv.ResampleAblation("L0H0", ref), halved], remote="local")
    with pytest.raises(NotRemotable, match="function would run inside the trace on the server"):
        iv.ablation_sweep(lm, tokens, kind=halved, remote="local")
    with pytest.raises(NotRemotable, match="a function as the written value cannot run remotely"):
        execute(lm, Run(tokens, writes=[Write("L0.z", lambda z: 2 * z, head=1)]), remote="local")
    assert server == []


class _Scaled(Ablation):
    """A custom ablation: its value is a function of the clean activation (cannot run remotely)."""

    def value(self, head, tokens, row_offset=0, positions=None):
        return lambda z: 0.5 * z


class _Wide(Ablation):
    """A custom ablation whose tensor value does not fit a head's z (d_head + 1 wide)."""

    def value(self, head, tokens):
        return torch.zeros(tokens.shape[0], tokens.shape[1], 9)


class _Noise(Ablation):
    """A custom ablation drawing its tensor value from torch's global generator (runs remotely)."""

    def value(self, head, tokens):
        return torch.randn(tokens.shape[0], tokens.shape[1], 8)


def test_custom_ablation_refused_before_anything_is_sent(server):
    """A custom Ablation whose value is a function of the activation (or does not fit the head) is
    refused by every primitive that takes ablations before any job: before the sweep's clean run and
    before another ablation's reference run (each was sent first, the refusal coming when the ablated
    run was built). One whose value is a tensor runs, with the local numbers (asking its value before
    sending leaves torch's generator as it was)."""
    model, lm = build("gpt2")
    tokens, ref = toks(), toks(4, 8, seed=2)
    calls = [lambda abl: iv.per_token_loss(lm, tokens, [iv.MeanAblation("L0H0", ref), abl], batch_size=2,
                                           remote="local"),
             lambda abl: iv.run_with_ablations(lm, tokens, [iv.ResampleAblation("L0H0", ref), abl], remote="local"),
             lambda abl: iv.ablation_sweep(lm, tokens, kind=abl, remote="local"),
             lambda abl: iv.ablation_sweep(lm, tokens, kind=lambda heads: abl, heads=["L1H0"], remote="local")]
    refused = [(_Scaled("L1H0"), NotRemotable, r"_Scaled\(L1H0\).value returned a function of the activation "
                                               "for L1H0: it cannot run remotely"),
               (_Wide("L1H0"), ValueError, r"_Wide\(L1H0\).value for L1H0: a value of shape \([23], 8, 9\) does "
                                           "not fit")]
    for call in calls:
        for abl, error, match in refused:
            with pytest.raises(error) as e:
                call(abl)
            assert server == []
            assert re.search(match, str(e.value))
    for abl in (_Noise("L1H0"), [iv.MeanAblation("L0H0", ref), _Noise("L1H0")]):
        torch.manual_seed(5)
        got = iv.per_token_loss(lm, tokens, abl, batch_size=2, remote="local")
        torch.manual_seed(5)
        close(got, iv.per_token_loss(model, tokens, abl, batch_size=2))


class _MyMean(iv.MeanAblation):
    """A subclass passing prepare's keyword arguments on to ``super().prepare``."""

    def prepare(self, model, tokens, **kwargs):
        super().prepare(model, tokens, **kwargs)


def test_prepare_taking_keyword_arguments_runs_its_reference_remotely(server):
    """An ablation whose prepare takes ``**kwargs`` is given ``remote`` (its reference ran here, silently:
    on a hub-id wrapper, whose weights are not here, it failed asking for remote=True)."""
    model, lm = build("gpt2")
    tokens, ref = toks(), toks(4, 8, seed=2)
    close(iv.per_token_loss(lm, tokens, _MyMean("L1H0", ref), remote="local"),
          iv.per_token_loss(model, tokens, _MyMean("L1H0", ref)))
    assert len(server) == 2  # the reference and the ablated run


def test_bad_ablation_refused_before_another_ablations_reference_job(server):
    """Several ablations in one call: a head outside the model, a reference too short or outside the
    vocabulary in any of them is refused with ValueError before the first one's reference run is sent
    (each was refused only after that job); locally before any forward pass."""
    model, lm = build("gpt2")
    tokens, ref = toks(), toks(4, 8, seed=2)
    bad = [(iv.ZeroAblation("L5H0"), "layer 5 out of range"),
           (iv.ResampleAblation("L1H0", ref[:, :4]), "reference has 4 positions"),
           (iv.MeanAblation("L1H0", ref + VOCAB), "reference holds ids outside the vocabulary")]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        for abl, match in bad:
            for call in (iv.per_token_loss, iv.run_with_ablations):
                with pytest.raises(ValueError, match=match):
                    call(lm, tokens, [iv.MeanAblation("L0H0", ref), abl], remote="local")
                assert server == []
                with pytest.raises(ValueError, match=match):
                    call(model, tokens, [iv.MeanAblation("L0H0", ref), iv.PatternPreserving(abl)])
                assert calls == []
    finally:
        hook.remove()


def test_unloaded_weights_are_refused(server):
    """A wrapper whose weights were never loaded (hub id without dispatch=True: meta tensors) is
    refused locally and for remote="local", naming remote=True / dispatch=True."""
    model, lm = build("gpt2")
    model.to("meta")
    lm.dispatched = False  # as nnsight.LanguageModel("<hub id>") leaves it
    with pytest.raises(ValueError, match="not loaded.*remote=True.*dispatch=True"):
        iv.per_token_loss(lm, toks())
    with pytest.raises(NotRemotable, match="not loaded.*dispatch=True.*remote=True"):
        iv.per_token_loss(lm, toks(), remote="local")
    assert server == []


def test_registered_adapter_warns_remotely(monkeypatch, server):
    """A remote run on an architecture whose adapter was registered (not built in) warns that its
    writes are unproven (the take-effect check does not run remotely); a built-in one does not."""
    model, lm = build("gpt2")
    tokens = toks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iv.per_token_loss(lm, tokens, iv.ZeroAblation("L0H0"), remote="local")
    monkeypatch.setitem(ARCHS, "gpt2", replace(ARCHS["gpt2"]))
    with pytest.warns(UserWarning, match="registered adapter.*unproven"):
        iv.per_token_loss(lm, tokens, iv.ZeroAblation("L0H0"), remote="local")


def test_logit_diff_refused_before_the_source_run(server):
    """A logit_diff whose ids do not fit the batch or the vocabulary, or whose position is outside the
    sequence, is refused with ValueError before any job is sent (it was refused only after the source
    run, and path_patch's step-1 runs, were sent; ids outside the vocabulary failed inside the trace
    with an index error), and locally before any run."""
    model, lm = build("gpt2")
    clean, corrupted = toks(2, 6, seed=3), toks(2, 6, seed=4)
    bad = [(logit_diff(torch.tensor([1, 2, 3]), 4), "correct_ids has 3 ids but the batch has 2"),
           (logit_diff(1, 4, pos=9), "pos=9 out of range for 6 positions"),
           (logit_diff(VOCAB + 3, 4), "correct_ids .* outside the vocabulary"),
           (logit_diff(1, -2), "wrong_ids .* outside the vocabulary")]
    for metric, match in bad:
        for call in (lambda m, r: iv.patch_heads(m, clean, corrupted, metric, remote=r),
                     lambda m, r: patch_residual(m, clean, corrupted, metric, remote=r),
                     lambda m, r: iv.path_patch(m, clean, corrupted, metric, ["L0H0"], ["L1H0"], remote=r)):
            with pytest.raises(ValueError, match=match):
                call(lm, "local")
            assert server == []
            with pytest.raises(ValueError, match=match):
                call(model, False)


def test_gather_ids_outside_the_vocabulary_refused_before_sending(server):
    """execute with Gather ids outside the vocabulary raises ValueError naming it before any job is sent
    (it failed on the server with an index error; on a GPU locally, a device-side assert)."""
    from interventions.engine.tracing import Gather

    model, lm = build("llama")
    tokens = toks()
    for ids in (torch.tensor([3, VOCAB]), torch.tensor([[-1, 2]] * 3)):
        for m, remote in ((lm, "local"), (model, False)):
            with pytest.raises(ValueError, match=rf"Gather ids outside the vocabulary \[0, {VOCAB}\)"):
                execute(m, Run(tokens, returns=Gather(-1, ids)), remote=remote)
    assert server == []
