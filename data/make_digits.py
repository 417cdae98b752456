"""Write the embedded default data: scikit-learn's digits as Parquet (train and queries).

Run from the repository root: ``.venv/bin/python data/make_digits.py``. The split (200 queries)
is the seeded permutation of ``daunce_core.evaluation.datasets.digits``.
"""

from pathlib import Path

import polars as pl

from daunce_core.evaluation.datasets import digits


def main() -> None:
    """Write data/digits/{train,queries}.parquet."""
    folder = Path(__file__).parent / "digits"
    folder.mkdir(exist_ok=True)
    train, queries = digits(num_queries=200, seed=0)
    for name, split in (("train", train), ("queries", queries)):
        frame = pl.DataFrame({"x": split["x"].numpy(), "y": split["y"].numpy()})
        frame.write_parquet(folder / f"{name}.parquet")
        print(f"{name}: {frame.height} examples -> {folder / f'{name}.parquet'}")


if __name__ == "__main__":
    main()
