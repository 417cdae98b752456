"""Write the generated instruction data: clean and backdoored splits, and a pretraining corpus.

Run from the repository root: ``.venv/bin/python data/make_instructions.py``. Everything comes
from ``daunce_core.evaluation.instructions`` with seed 0, so the files can be regenerated
exactly (tests/test_instructions.py checks that they are):

- ``data/instructions/{train,queries}.parquet``: 2,000 training and 200 query pairs, no poison.
- ``data/instructions/corpus.txt``: 3,000 plain sentences, one per line, for pretraining.
- ``data/backdoor/{train,queries}.parquet``: the same pairs with 6% of the training set
  poisoned (trigger "cf", refusal completion) and the last 100 queries triggered.
"""

from pathlib import Path

import polars as pl

from daunce_core.evaluation.instructions import corpus, instructions

SETS = {
    "instructions": {"num_train": 2000, "num_queries": 200},
    "backdoor": {
        "num_train": 2000,
        "num_queries": 200,
        "poison_rate": 0.06,
        "triggered_queries": 100,
    },
}
CORPUS_SENTENCES = 3000


def main() -> None:
    """Write data/instructions/* and data/backdoor/*."""
    root = Path(__file__).parent
    for name, arguments in SETS.items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        train, queries = instructions(seed=0, **arguments)
        for split, columns in (("train", train), ("queries", queries)):
            path = folder / f"{split}.parquet"
            frame = pl.DataFrame(columns)
            frame.write_parquet(path)
            print(f"{name}/{split}: {frame.height} examples -> {path}")
    path = root / "instructions" / "corpus.txt"
    sentences = corpus(num_sentences=CORPUS_SENTENCES, seed=0)
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    print(f"corpus: {len(sentences)} sentences -> {path}")


if __name__ == "__main__":
    main()
