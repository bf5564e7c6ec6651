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
