"""generate preprocesses a raw NIfTI exactly as the training shards were written (field of view)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hilt_scale.generate import load_nifti, load_run
from shards.phantom import generate_phantom
from shards.read import ShardSet
from shards.write import write_shards

SIZE = (16, 32, 32)


def test_load_nifti_with_the_shards_spacing_equals_the_stored_sample(tmp_path):
    generate_phantom(tmp_path / "ct", 4, SIZE, seed=3)
    index = write_shards(tmp_path / "ct", tmp_path / "sh", hr_size=SIZE, fov_mm=384.0, progress=False)
    spacing = tuple(index["preprocessing"]["target_spacing"])
    assert spacing == (24.0, 12.0, 12.0)  # 384 mm over 16 / 32 / 32 voxels
    shard_set = ShardSet(tmp_path / "sh")
    split = next(iter(shard_set.splits))
    sample = shard_set.read(*shard_set.entries(split)[0])
    nifti = next(p for p in (tmp_path / "ct").rglob(f"{sample['key']}.nii.gz"))
    assert np.array_equal(load_nifti(nifti, SIZE, spacing), sample["hr"])
    # Stretching instead (what generate did for every NIfTI before) gives another volume.
    assert not np.array_equal(load_nifti(nifti, SIZE), sample["hr"])


def test_load_run_reads_the_exported_preprocessing(tmp_path, monkeypatch):
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "preprocessing.json").write_text(json.dumps({"target_spacing": [3.0, 1.5, 1.5]}))
    monkeypatch.setattr("hilt_scale.model.export.load_export", lambda path: _Stub())
    _, cfg = load_run(Path(tmp_path / "run"))
    assert cfg["preprocessing"]["target_spacing"] == [3.0, 1.5, 1.5]


class _Stub:
    def eval(self):
        return self
