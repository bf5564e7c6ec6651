"""The survey scales: one model at a time (each released before the next loads), resumable after an
interruption (per-model tables keyed on the model's identity), every model checked before any work,
remote execution passed through or refused, and a mosaic that stays legible with 40 models.

Models: a dozen tiny ones built from configs of four architectures (GPT-2, GPT-NeoX, Llama with
grouped-query attention, our attn_only), saved to temporary folders."""

import json
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import survey as S
from experiments.__main__ import main as cli_main
from experiments.common import InputError, Results

KW = {"seq_len": 6, "n_examples": 2}
REAL_LOAD = S.load_any  # tiny probes: the survey's plumbing is under test, not the scores


def _config(arch: str, n_layers: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    from interventions import AttnOnlyConfig

    common = {"vocab_size": 40, "bos_token_id": 0, "eos_token_id": 0}
    if arch == "gpt2":
        return GPT2Config(n_layer=n_layers, n_head=2, n_embd=16, n_positions=32, **common)
    if arch == "neox":
        return GPTNeoXConfig(num_hidden_layers=n_layers, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                             max_position_embeddings=32, **common)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                           intermediate_size=32, max_position_embeddings=32, **common)
    return AttnOnlyConfig(n_layers=n_layers, n_heads=2, d_model=16, n_ctx=32, vocab_size=40)


def save_model(folder: Path, arch: str, n_layers: int, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM

    import interventions  # noqa: F401  (registers attn_only with the Auto classes)

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(_config(arch, n_layers)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dozen(tmp_path_factory):
    """label -> folder of 12 tiny models: 4 architectures x 1-3 layers."""
    root = tmp_path_factory.mktemp("models")
    return {f"{arch}-{n}l": save_model(root / f"{arch}-{n}l", arch, n)
            for arch in ("gpt2", "neox", "llama", "attn_only") for n in (1, 2, 3)}


class Loads:
    """Wraps ``load_any``: counts loads and proves each model was released before the next loaded."""

    def __init__(self, monkeypatch, fail_at: int | None = None):
        self.refs, self.labels, self.fail_at = [], [], fail_at
        real = REAL_LOAD

        def load(spec, *args, **kwargs):
            alive = [i for i, r in enumerate(self.refs) if r() is not None]
            assert not alive, f"models {alive} still alive when the next one loads"
            if self.fail_at is not None and len(self.refs) == self.fail_at:
                raise KeyboardInterrupt  # as Ctrl-C in the middle of a survey
            model = real(spec, *args, **kwargs)
            self.refs.append(weakref.ref(model))
            self.labels.append(Path(spec).name)
            return model

        monkeypatch.setattr(S, "load_any", load)


def test_a_dozen_architectures_one_at_a_time_each_released(dozen, tmp_path, monkeypatch):
    """Every model of four architectures is scored (one row per layer x head, equal to scoring that
    model directly); each is released (its weakref dead) before the next one loads and after the last."""
    from experiments.phase_change import probe_kwargs
    from interventions.analysis import scores
    from interventions.engine.adapters import get_adapter
    from interventions.zoo.train import load_model

    loads = Loads(monkeypatch)
    table = S.run_survey(dozen, tmp_path / "res", **KW).read("induction_scores")
    assert len(loads.refs) == 12 and all(r() is None for r in loads.refs)
    assert list(table.model.unique()) == list(dozen)
    for label, folder in dozen.items():
        model = load_model(folder)
        a = get_adapter(model)
        rows = table[table.model == label]
        assert len(rows) == a.n_layers * a.n_heads, label
    model = load_model(dozen["llama-2l"])
    kw = probe_kwargs(model)
    kw.pop("prefix_tokens")
    kw["seq_len"] = min(KW["seq_len"], kw["seq_len"])
    direct = scores.induction_score(model, n_examples=KW["n_examples"], **kw)
    got = table[table.model == "llama-2l"].sort_values(["layer", "head"])
    assert torch.allclose(torch.tensor(got.score.to_numpy()), torch.tensor(direct.score.to_numpy()), atol=1e-6)


def test_an_interrupted_survey_resumes_without_reloading_finished_models(dozen, tmp_path, monkeypatch):
    """Ctrl-C during the 8th model leaves 7 finished tables; the same call again loads only the 5 left
    and gives the uninterrupted survey's table; a third call loads nothing; a model re-saved with other
    weights under the same path is the only one scored again."""
    root = tmp_path / "res"
    loads = Loads(monkeypatch, fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        S.run_survey(dozen, root, **KW)
    res = Results(root, "survey")
    assert sum(res.has(S._table(label)) for label in dozen) == 7 and not res.has("induction_scores")
    loads = Loads(monkeypatch)
    resumed = S.run_survey(dozen, root, **KW).read("induction_scores")
    assert loads.labels == list(dozen)[7:]
    whole = S.run_survey(dozen, tmp_path / "whole", **KW).read("induction_scores")
    pd.testing.assert_frame_equal(resumed, whole)
    loads = Loads(monkeypatch)
    S.run_survey(dozen, root, **KW)
    assert loads.labels == []
    moved = tmp_path / "gpt2-2l"
    models = {**dozen, "gpt2-2l": save_model(moved, "gpt2", 2, seed=0)}
    S.run_survey(models, root, **KW)  # a new folder: scored once
    save_model(moved, "gpt2", 2, seed=1)
    loads = Loads(monkeypatch)
    S.run_survey(models, root, **KW)
    assert loads.labels == ["gpt2-2l"]


def test_a_rerun_on_another_device_scores_every_model_again(dozen, tmp_path, monkeypatch):
    """A model's table is keyed on the device its scores were computed on (they differ slightly by device):
    a rerun with the same device loads nothing, one with another device loads and scores every model again
    (its old rows are not served), and an unknown device is refused before any work."""
    models = {label: dozen[label] for label in ("gpt2-1l", "llama-1l")}
    root = tmp_path / "res"
    S.run_survey(models, root, device="cpu", **KW)
    seen = []

    def load(spec, device, *args, **kwargs):
        seen.append((Path(spec).name, device))
        return REAL_LOAD(spec, "cpu", *args, **kwargs)  # the key is under test, not an accelerator

    monkeypatch.setattr(S, "load_any", load)
    S.run_survey(models, root, device="cpu", **KW)
    assert seen == []
    S.run_survey(models, root, device="cuda", **KW)
    assert seen == [("gpt2-1l", "cuda"), ("llama-1l", "cuda")]
    S.run_survey(models, root, device="cuda", **KW)
    assert len(seen) == 2
    assert S.score_device("cuda:1") != S.score_device("cuda") != S.score_device("cpu")
    with pytest.raises(InputError, match="not a known device"):
        S.run_survey(models, tmp_path / "other", device="gpu", **KW)
    assert not (tmp_path / "other").exists() and len(seen) == 2


def _fake_hub(tmp_path, monkeypatch, commits: dict):
    """``hf_hub_download`` answering from ``commits`` (revision -> commit) with a tiny GPT-2's config,
    and ``from_pretrained`` of a hub name building that model: the hub path without the network."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    folder = save_model(tmp_path / "hub-weights", "gpt2", 2)
    asked = []

    def download(repo_id, filename, revision=None, **kw):
        if repo_id != "org/tiny" or revision not in commits:
            raise OSError(f"{repo_id}@{revision} not found")
        snap = tmp_path / "hub" / "snapshots" / commits[revision]
        snap.mkdir(parents=True, exist_ok=True)
        (snap / filename).write_text((Path(folder) / "config.json").read_text())
        return str(snap / filename)

    real = AutoModelForCausalLM.from_pretrained

    def from_pretrained(name, *args, revision=None, **kw):
        if name == "org/tiny":
            asked.append(revision)
            return real(folder)
        return real(name, *args, revision=revision, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return asked


def test_hub_models_are_keyed_on_the_resolved_commit(tmp_path, monkeypatch):
    """A hub model's table is keyed on its name and the commit its revision resolves to (found from
    config.json alone): a rerun loads nothing; when the branch moves to a new commit it is scored again,
    and the weights asked for are the pinned commit's."""
    commits = {None: "a" * 40, "v1": "b" * 40}
    asked = _fake_hub(tmp_path, monkeypatch, commits)
    S.run_survey({"tiny": "org/tiny", "tiny@v1": "org/tiny@v1"}, tmp_path / "res", **KW)
    assert asked == ["a" * 40, "b" * 40]
    S.run_survey({"tiny": "org/tiny", "tiny@v1": "org/tiny@v1"}, tmp_path / "res", **KW)
    assert len(asked) == 2
    commits[None] = "c" * 40  # the default branch moved
    S.run_survey({"tiny": "org/tiny", "tiny@v1": "org/tiny@v1"}, tmp_path / "res", **KW)
    assert asked[2:] == ["c" * 40]


def test_every_model_is_checked_before_any_is_loaded(dozen, tmp_path, monkeypatch, capsys):
    """An unsupported architecture, a hub name that does not resolve (offline), a malformed pin, a
    folder without a config, one whose weights are pickle-only or truncated, or a run without its
    train_config.json among the models: exit 2 naming the model, nothing loaded, nothing written."""
    from transformers import BertConfig

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(BertConfig(vocab_size=40).to_dict()))
    (tmp_path / "empty").mkdir()
    pickled = Path(save_model(tmp_path / "pickled", "gpt2", 1))  # weights only as pytorch_model.bin
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    from transformers import GPT2LMHeadModel

    from interventions.zoo.train import save_checkpoint

    bare_run = tmp_path / "bare-run"  # a run's checkpoints copied without its train_config.json
    model = GPT2LMHeadModel(_config("gpt2", 1))
    save_checkpoint(bare_run, 5, model, torch.optim.SGD(model.parameters(), lr=0.1), 100)
    truncated = Path(save_model(tmp_path / "truncated", "gpt2", 1))  # an interrupted copy
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:-50])
    loads = Loads(monkeypatch)
    for bad, says in ((str(bert), "architecture 'bert'"), ("nobody/no-such-model", "could not resolve"),
                      ("gpt2@", "NAME@REVISION"), (str(tmp_path / "empty"), "no config.json"),
                      (str(pickled), "only pytorch_model.bin"), (str(truncated), "missing or damaged"),
                      (str(bare_run), "no train_config.json")):
        try:
            code = cli_main(["survey", *dozen.values(), bad, "--out", str(tmp_path / "res"), "--quiet"])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err, err
    assert loads.labels == [] and not (tmp_path / "res").exists()


def test_a_folder_given_as_dot_is_labelled_by_its_name(dozen, tmp_path, monkeypatch):
    """``survey .`` from inside a model folder (or ``x/..``): the model is labelled with the folder's name,
    not an empty label (written as an empty cell, read back as NaN, and the mosaic crashed)."""
    monkeypatch.chdir(dozen["gpt2-1l"])
    assert S.model_labels([".", "../llama-1l/.."]) == {"gpt2-1l": ".", Path(dozen["gpt2-1l"]).parent.name: "../llama-1l/.."}
    out = tmp_path / "res"
    assert cli_main(["survey", ".", "../llama-1l", "--out", str(out), "--quiet"]) == 0
    assert list(Results(out, "survey").read("induction_scores").model.unique()) == ["gpt2-1l", "llama-1l"]
    assert (out / "figures" / "induction_mosaic.png").is_file()


def test_remote_is_refused_before_work_without_primitive_support(dozen, tmp_path, capsys):
    """``--remote`` while the head scores take no ``remote=``: exit 2 naming why, nothing written."""
    from interventions.analysis import scores

    assert not S.remote_supported(scores.induction_score)  # TODO(issue 13 item 1): flips with remote execution
    try:
        code = cli_main(["survey", dozen["gpt2-1l"], "--remote", "--out", str(tmp_path / "res"), "--quiet"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "--remote cannot run" in err and "attention patterns" in err, err
    assert not (tmp_path / "res").exists()


def test_remote_passes_through_to_the_scores_when_supported(tmp_path, monkeypatch):
    """With head scores that take ``remote=``, a remote survey builds the hub model by name at its
    resolved commit (no local weights) and passes ``remote=True`` to every score call; local folders
    are refused."""
    from interventions.analysis import scores
    from interventions.zoo.train import load_model

    commits = {None: "d" * 40}
    _fake_hub(tmp_path, monkeypatch, commits)
    calls, built = [], []
    real = scores.induction_score

    def induction_score(model, *args, remote=False, **kw):
        calls.append(remote)
        return real(model, *args, **kw)

    monkeypatch.setattr(scores, "induction_score", induction_score)
    monkeypatch.setattr(S, "load_remote", lambda spec, commit: built.append((spec, commit)) or
                        load_model(tmp_path / "hub-weights"))
    monkeypatch.setattr(S, "load_any", lambda *a, **k: pytest.fail("a remote survey loaded weights locally"))
    S.run_survey({"tiny": "org/tiny"}, tmp_path / "res", remote=True, **KW)
    assert calls == [True] and built == [("org/tiny", "d" * 40)]
    with pytest.raises(InputError, match="--remote scores hub models only"):
        S.run_survey({"here": str(tmp_path / "hub-weights")}, tmp_path / "res2", remote=True, **KW)


def test_readme_survey_command_writes_tables_and_mosaic(tmp_path, monkeypatch, capsys):
    """The README's offline survey command, run as written (its model paths filled with tiny models
    of three architectures): exit 0, the combined table with every model, and the mosaic (PNG, PDF)."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln for ln in re.findall(r"^python -m experiments survey .*$", readme, re.M) if "# online" not in ln]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])[3:]
    specs = [a for a in argv[1:] if not a.startswith("--") and argv[argv.index(a) - 1] != "--out"]
    monkeypatch.chdir(tmp_path)
    for spec, arch in zip(specs, ("attn_only", "gpt2", "llama")):
        save_model(Path(spec), arch, 2)
    assert cli_main(argv + ["--quiet"]) == 0
    out = Path(argv[argv.index("--out") + 1])
    assert set(Results(out, "survey").read("induction_scores").model) == {Path(s).name for s in specs}
    for ext in ("png", "pdf"):
        assert (out / "figures" / f"induction_mosaic.{ext}").stat().st_size > 0


def test_mosaic_of_40_models_is_legible():
    """40 models of 1-80 layers and 4-64 heads: one panel per model titled with its label (or its end),
    every panel at least 1.1 x 0.7 inches, the figure within 16 x 9 inches, and no two text labels
    (titles, tick labels) and no title and another panel overlap."""
    import matplotlib.pyplot as plt

    from experiments.figures import _fit_label, mosaic_figure

    g = torch.Generator().manual_seed(0)
    shapes = [(1 + (7 * i) % 80, (4, 8, 12, 16, 32, 64)[i % 6]) for i in range(40)]
    labels = [("EleutherAI/pythia-%dm-deduped-v0", "gpt2-%d", "meta-llama/Llama-3.2-%dB-Instruct",
               "runs/attn-%dl")[i % 4] % i for i in range(40)]
    sv = pd.concat([pd.DataFrame({"model": label, "layer": torch.arange(n_l).repeat_interleave(n_h).numpy(),
                                  "head": torch.arange(n_h).repeat(n_l).numpy(),
                                  "score": torch.rand(n_l * n_h, generator=g).numpy()})
                    for label, (n_l, n_h) in zip(labels, shapes)])
    fig = mosaic_figure(sv)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        w, h = fig.get_size_inches()
        assert w <= 16 and h <= 9, (w, h)
        panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
        assert [ax.get_title(loc="left") for ax in panels] == [_fit_label(label) for label in labels]
        dpi = fig.dpi
        texts = []
        for i, ax in enumerate(panels):
            box = ax.get_window_extent(r)
            assert box.width / dpi >= 1.1 and box.height / dpi >= 0.7, (labels[i], box.width / dpi, box.height / dpi)
            title = ax.title if ax.title.get_text() else ax._left_title
            texts.append((i, "title", title.get_window_extent(r)))
            texts += [(i, "tick", t.get_window_extent(r)) for t in ax.get_xticklabels() + ax.get_yticklabels()
                      if t.get_text()]
        for n, (i, kind, a) in enumerate(texts):
            for j, other_kind, b in texts[n + 1:]:
                if i != j:
                    assert not a.overlaps(b), (labels[i], kind, labels[j], other_kind)
            if kind == "title":
                for j, ax in enumerate(panels):
                    if j != i:
                        assert not a.overlaps(ax.get_window_extent(r)), (labels[i], "title over panel", labels[j])
    finally:
        plt.close(fig)


def test_mosaic_titles_tell_apart_models_whose_labels_end_alike():
    """Checkpoints of different runs given by long paths (labels are whole paths where basenames clash,
    e.g. .../attn-1l/final and .../attn-2l/final): every panel's title is different, and each still
    names what tells its model apart (the run), not only the shared end."""
    import matplotlib.pyplot as plt

    from experiments.figures import mosaic_figure

    labels = ["/home/someone/zoo/runs/attn-1l/final", "/home/someone/zoo/runs/attn-2l/final",
              "/home/someone/zoo/runs/attn-1l/checkpoints/step-00001000",
              "/home/someone/zoo/runs/attn-2l/checkpoints/step-00001000", "EleutherAI/pythia-70m-deduped-v0"]
    sv = pd.concat([pd.DataFrame({"model": label, "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                                  "score": [0.1, 0.2, 0.3, 0.4]}) for label in labels])
    fig = mosaic_figure(sv)
    try:
        titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
        assert len(titles) == len(labels) and len(set(titles)) == len(labels), titles
        assert all(len(t) <= 26 for t in titles), titles
        for title, label in zip(titles, labels):
            run = next((p for p in label.split("/") if p.startswith("attn-")), None)
            assert run is None or run in title, (title, label)
        assert titles[-1] == "pythia-70m-deduped-v0"
    finally:
        plt.close(fig)


def test_mosaic_titles_of_models_pinned_to_a_commit_name_the_model():
    """Hub models pinned to a commit (``NAME@<40-hex sha>``, as the README recommends): each title names
    the model and a short commit, not the tail of the hash alone (which left every panel anonymous)."""
    from experiments.figures import _fit_labels

    sha, other = "607a30d783dfa663caf39e06633721c8d4cfcd7e", "a39f36b100fe8a5377810d56c3f4789b9c53ac42"
    labels = [f"gpt2@{sha}", f"EleutherAI/pythia-70m@{other}", f"EleutherAI/pythia-160m-deduped@{other}",
              f"gpt2@{other}"]
    titles = _fit_labels(labels)
    assert titles == [f"gpt2@{sha[:7]}", f"pythia-70m@{other[:7]}", f"\u2026thia-160m-deduped@{other[:7]}",
                      f"gpt2@{other[:7]}"], titles


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "cl100k_base.tiktoken"]


@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_a_model_folders_identity_covers_its_tokenizer_files(tmp_path, name):
    """A model folder's content hash changes with any of its tokenizer files, JSON or not (the scores take
    their probe tokens and BOS from the tokenizer); documentation and hidden files change nothing."""
    folder = Path(save_model(tmp_path / "m", "gpt2", 1))
    (folder / name).write_bytes(b"one")
    before = S.model_identity(str(folder))
    for unrelated in ("README.md", "LICENSE", "notes.md", ".gitattributes"):
        (folder / unrelated).write_text("docs")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main")
    assert S.model_identity(str(folder)) == before
    (folder / name).write_bytes(b"two")
    assert S.model_identity(str(folder)) != before


def _save_tokenizer(folder: Path, alphabet: str) -> None:
    """A 1100-token BPE trained on random text over ``alphabet`` (other alphabets: other printable ids)."""
    import random

    from interventions.zoo.tokenizer import train_tokenizer

    rng = random.Random(0)
    train_tokenizer(["".join(rng.choice(alphabet) for _ in range(20000))], vocab_size=1100).save_pretrained(folder)


def test_a_tokenizer_beside_the_model_folder_is_part_of_its_identity(tmp_path, monkeypatch):
    """The scores read a tokenizer in the model folder's ``tokenizer/`` or up to two levels above (a
    run's checkpoint keeps it in the run's ``tokenizer/``), and a model of 1100 ids takes its probe tokens
    from it: after that tokenizer changes the model is scored again, equal to a survey into a new folder."""
    import shutil

    from interventions import AttnOnlyConfig, AttnOnlyForCausalLM
    from interventions.analysis.scores import tokenizer_folders

    run = tmp_path / "run"
    folder = run / "checkpoints" / "step-00000001"
    torch.manual_seed(0)
    AttnOnlyForCausalLM(AttnOnlyConfig(n_layers=1, n_heads=2, d_model=16, n_ctx=32, vocab_size=1100)
                        ).save_pretrained(folder)
    _save_tokenizer(run / "tokenizer", "abcdefghij klmnop\n")
    assert tokenizer_folders(folder) == [(run / "tokenizer").resolve()]
    models = {"m": str(folder)}
    S.run_survey(models, tmp_path / "res", **KW)
    loads = Loads(monkeypatch)
    S.run_survey(models, tmp_path / "res", **KW)
    assert loads.labels == []  # unchanged: served from the cache
    shutil.rmtree(run / "tokenizer")
    _save_tokenizer(run / "tokenizer", "ABCDEFGHIJ 0123456789\n")
    again = S.run_survey(models, tmp_path / "res", **KW).read("induction_scores")
    assert loads.labels == [folder.name]
    pd.testing.assert_frame_equal(again, S.run_survey(models, tmp_path / "fresh", **KW).read("induction_scores"))


def test_a_runs_identity_covers_its_tokenizer(tmp_path, monkeypatch):
    """A run (text corpus) keeps its tokenizer in ``tokenizer/`` beside ``checkpoints/``: rewriting it
    changes the run's identity in the survey."""
    from interventions.zoo import train as T
    from interventions.zoo.tokenizer import byte_tokenizer

    monkeypatch.setenv("INTERVENTIONS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"f{i}.txt").write_text(f"file {i}: " + "abcdefgh " * 200)
    cfg = T.TrainConfig.from_dict(dict(corpus=str(tmp_path / "corpus"), vocab_size=257, batch_size=4, tokens=32 * 4 * 2,
                                       n_checkpoints=1, n_eval_windows=4,
                                       model=dict(n_layers=1, n_heads=2, d_model=16, n_ctx=32)))
    run = tmp_path / "run"
    T.train(cfg, run, progress=False)
    before = S.model_identity(str(run))
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|pad|>"]})
    tok.save_pretrained(run / "tokenizer")
    assert S.model_identity(str(run)) != before
