"""The README's python examples run as written."""

import re
from pathlib import Path

import jax

import tolerances as tol


def test_readme_example_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "trainable:" in capsys.readouterr().out


def test_readme_nnx_example_trains():
    """The NNX recipe: its losses fall, and the merged model is the factored one."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "nnx" in b]
    namespace: dict = {"print": lambda *args: None}
    exec(compile(block, "README.md", "exec"), namespace)
    lj, model, x = namespace["lj"], namespace["model"], namespace["x"]
    factored = namespace["forward"](lj.combine(namespace["frozen"], namespace["trainable"]), x)
    # float32: each layer's |x|·|W| (its sums' magnitude) through chains of at most
    # 16 + 64 reductions plus the rank-4 adapter's 4 + 2 roundings per layer (both paths)
    hidden = jax.nn.relu(model.up(x))
    scale = tol.scale_of(
        abs(x) @ abs(model.up.kernel[...]), abs(hidden) @ abs(model.down.kernel[...])
    )
    tol.assert_close(model(x), factored, tol.chain_atol(16 + 64 + 2 * 6, scale), "merged model")
