"""manifest.parquet → Samples: fractional weights, overrides, errors naming the file and row; prepare_data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm_core.config import DataConfig, MixtureConfig
from vlm_core.data.errors import DataError
from vlm_core.data.manifest import METADATA_KEY, expand, read_manifest
from vlm_core.types import Sample, Turn


def _write(path: Path, rows: list[dict], metadata: dict | None = None) -> Path:
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})
    pq.write_table(table, path)
    return path


def _rows(tmp_path: Path, counts: dict[str, int], weights: dict[str, float]) -> list[dict]:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image)
    conversation = json.dumps([{"role": "user", "text": "<image>\nWhat colour?"}, {"role": "assistant", "text": "Red."}])
    return [
        {"uid": f"{source}/{i}", "id": str(i), "source": source, "images": [str(image)], "conversations": conversation,
         "skill": "color", "meta": "{}", "weight": weights[source]}
        for source, n in counts.items() for i in range(n)
    ]


def _samples(n: int, source: str) -> list[Sample]:
    return [Sample(id=str(i), source=source, image_paths=(), turns=(Turn("user", "q"), Turn("assistant", "a")))
            for i in range(n)]


@pytest.mark.parametrize(("weight", "expected"), [(0.3, 30), (1.0, 100), (2.5, 250), (0.0, 0), (1.004, 100)])
def test_fractional_weights_expand_by_repetition_and_seeded_share(weight: float, expected: int) -> None:
    out = expand({"a": _samples(100, "a")}, {"a": weight}, seed=3)
    assert len(out) == expected
    counts = Counter(sample.id.split("@")[0] for sample in out)
    assert max(counts.values(), default=0) <= int(weight) + 1 and len(set(s.id for s in out)) == len(out)
    assert [s.id for s in expand({"a": _samples(100, "a")}, {"a": weight}, seed=3)] == [s.id for s in out]


def test_the_share_depends_on_the_seed() -> None:
    a = {s.id for s in expand({"a": _samples(100, "a")}, {"a": 0.5}, seed=1)}
    b = {s.id for s in expand({"a": _samples(100, "a")}, {"a": 0.5}, seed=2)}
    assert a != b and len(a) == len(b) == 50


def test_read_manifest_and_override_weights(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.parquet", _rows(tmp_path, {"world": 40, "ocr": 20}, {"world": 1.0, "ocr": 0.5}),
                  {"mixture_seed": 7})
    manifest = read_manifest(path)
    assert manifest.weights == {"world": 1.0, "ocr": 0.5} and manifest.seed == 7
    assert len(manifest.mixture()) == 50
    assert len(manifest.mixture({"ocr": 2.0})) == 80
    sample = manifest.samples["world"][0]
    assert sample.turns[1] == Turn("assistant", "Red.") and sample.skill == "color"
    with pytest.raises(ValueError, match=r"mixture.weights names \['nope'\].*sources are \['ocr', 'world'\]"):
        manifest.mixture({"nope": 1.0})


def test_bad_manifests_name_the_file_and_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "missing.parquet")
    rows = _rows(tmp_path, {"world": 2}, {"world": 1.0})
    rows[1]["images"] = [str(tmp_path / "gone.png")]
    with pytest.raises(DataError, match=r"row world/1: image .*gone\.png is missing"):
        read_manifest(_write(tmp_path / "m.parquet", rows))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_manifest(tmp_path / "junk.parquet")


def test_prepare_data_from_a_manifest(tmp_path: Path) -> None:
    from vlm_core.data.prepare import prepare_data

    path = _write(tmp_path / "m.parquet", _rows(tmp_path, {"mine": 10}, {"mine": 1.0}))
    cfg = DataConfig(source="manifest", path=str(path), cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, tmp_path / "run", show_progress=False, mixture=MixtureConfig(weights={"mine": 2.0}))
    assert len(data.train) == 20 and data.eval == [] and data.world is None
    assert (tmp_path / "run" / "quarantine.jsonl").is_file()
    with pytest.raises(ValueError, match="data.source=manifest needs data.path"):
        DataConfig(source="manifest")
