"""The README's Python example runs as written and finds sensible proponents."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    block = re.search(r"## DAUNCE in Python\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
    output = capsys.readouterr().out
    assert "proponents (index, score)" in output
    result, train, queries = namespace["result"], namespace["train"], namespace["queries"]
    # The proponents are mostly of the query's class (10% by chance): the influence function
    # (the default subspace scores) also ranks high-loss examples of other classes that move
    # the query's loss, so not all of them.
    proponents = [i for i, _ in result.top_proponents(0, k=5)]
    assert (train["y"][proponents] == queries["y"][0]).float().mean() >= 0.6
    top = result.scores.argsort(axis=0)[::-1][:5]
    assert (train["y"].numpy()[top] == queries["y"].numpy()).mean() >= 0.6
