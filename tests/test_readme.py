"""The README's library tour runs as written (docs match behaviour)."""

import re
from pathlib import Path


def test_readme_tour_runs(tmp_path, monkeypatch):
    """Every ```python block of README.md executes without error."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        path = tmp_path / f"readme_block_{i}.py"  # nnsight traces need their source in a file
        path.write_text(code)
        exec(compile(code, str(path), "exec"), {"__name__": f"readme_block_{i}"})


def test_readme_site_table_matches_the_vocabulary():
    """The README's site table lists exactly the engine's site kinds, in execution order, with the
    shapes the sites module documents."""
    from interventions.engine import sites

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `(L0\.[a-z_]+|final)` \| `(\([a-z_, ]+\))` \|", text, re.M)
    kinds = [name.split(".")[-1] for name, _ in rows]
    assert kinds == list(sites.SITE_KINDS)
    doc = sites.__doc__
    for name, shape in rows:
        kind = name.split(".")[-1]
        assert re.search(rf"^{kind}\s+{re.escape(shape)}", doc, re.M) or (kind == "final" and shape in doc), kind
