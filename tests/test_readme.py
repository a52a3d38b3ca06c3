"""The README's usage example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "trainable:" in capsys.readouterr().out
