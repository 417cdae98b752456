"""Users' data in every supported format becomes the same canonical form."""

import datasets
import numpy as np
import polars as pl
import pytest

from daunce_core.errors import DaunceError
from daunce_core.storage.sources import DataSource, read_canonical, read_sources, write_canonical


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(12, 5)).astype(np.float32), "y": rng.integers(0, 3, 12)}


def write_all(folder, table):
    frame = pl.DataFrame({"x": table["x"], "y": table["y"]})
    frame.write_parquet(folder / "d.parquet")
    frame.with_columns(pl.col("x").cast(pl.List(pl.Float32))).write_ndjson(folder / "d.jsonl")
    np.savez(folder / "d.npz", **table)
    datasets.Dataset.from_dict({"x": table["x"].tolist(), "y": table["y"].tolist()}).save_to_disk(
        str(folder / "hf")
    )
    return [folder / "d.parquet", folder / "d.jsonl", folder / "d.npz", folder / "hf"]


def test_every_format_reads_to_the_same_examples(tmp_path, table):
    for path in write_all(tmp_path, table):
        columns, ids = read_sources([DataSource(path=str(path))])
        np.testing.assert_allclose(columns["x"], table["x"], rtol=1e-6)
        np.testing.assert_array_equal(columns["y"], table["y"])
        np.testing.assert_array_equal(ids, np.arange(12))


def test_canonical_form_round_trips_with_stable_digests(tmp_path, table):
    first = write_canonical(table, np.arange(12), tmp_path / "a")
    again = write_canonical(dict(table), np.arange(12), tmp_path / "b")
    assert first["digest"] == again["digest"]
    columns, _ids = read_canonical(tmp_path / "a")
    np.testing.assert_array_equal(columns["x"], table["x"])
    index = pl.read_parquet(tmp_path / "a" / "index.parquet")
    assert index["example_id"].to_list() == list(range(12))
    changed = dict(table, y=table["y"][::-1].copy())
    assert write_canonical(changed, np.arange(12), tmp_path / "c")["digest"] != first["digest"]


def test_columns_ids_and_appended_sources(tmp_path, table):
    frame = pl.DataFrame({"pixels": table["x"], "label": table["y"], "uid": np.arange(12) * 10})
    frame.write_parquet(tmp_path / "a.parquet")
    source = DataSource(
        path=str(tmp_path / "a.parquet"), columns={"x": "pixels", "y": "label"}, id_column="uid"
    )
    columns, ids = read_sources([source])
    assert sorted(columns) == ["x", "y"]
    np.testing.assert_array_equal(ids, np.arange(12) * 10)
    np.savez(tmp_path / "more.npz", x=table["x"][:3], y=table["y"][:3])
    _, ids = read_sources([source, DataSource(path=str(tmp_path / "more.npz"))])
    assert ids[-3:].tolist() == [111, 112, 113]


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (DataSource(path="missing.parquet"), "does not exist"),
        (DataSource(path="data.csv"), "cannot tell the format"),
        (DataSource(path="x.parquet", format="excel"), "format must be one of"),
    ],
)
def test_bad_sources_are_refused(tmp_path, source, match):
    if source.path == "data.csv":
        (tmp_path / "data.csv").write_text("a,b\n")
        source = DataSource(path=str(tmp_path / "data.csv"))
    if source.path == "x.parquet":
        pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "x.parquet")
        source = DataSource(path=str(tmp_path / "x.parquet"), format="excel")
    with pytest.raises(DaunceError, match=match):
        read_sources([source])


def test_unknown_column_names_the_fix(tmp_path, table):
    np.savez(tmp_path / "d.npz", **table)
    with pytest.raises(DaunceError, match=r"no column\(s\) \['pixels'\]"):
        read_sources([DataSource(path=str(tmp_path / "d.npz"), columns={"x": "pixels"})])


def test_a_missing_text_value_is_refused_not_written_as_none(tmp_path):
    import polars as pl

    from daunce_core.storage.sources import DataSource, read_sources, write_canonical

    path = tmp_path / "pairs.parquet"
    pl.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", None, "z"]}).write_parquet(path)
    columns, ids = read_sources([DataSource(path=str(path))])
    with pytest.raises(DaunceError, match=r"'completion' has missing \(null\).*rows \[1\]"):
        write_canonical(columns, ids, tmp_path / "canonical", text=["prompt", "completion"])
