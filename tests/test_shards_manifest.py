"""Manifest input that tries to escape --out, broken quoting, non-UTF-8 rows, no rows at all."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shards.ingest import DataError, manifest_records
from shards.read import ShardSet
from shards.verify import verify_shards
from shards.write import write_shards

REPORT = "Trachea and both main bronchi are open. No pleural effusion was detected on either side."


def _vols(d: Path, n: int) -> list[str]:
    names = []
    for i in range(n):
        nib.Nifti1Image(np.full((6, 6, 6), i * 50 - 500, np.int16), np.eye(4)).to_filename(d / f"v{i}.nii.gz")
        names.append(f"v{i}.nii.gz")
    return names


def _write(d: Path, lines: list[bytes]) -> Path:
    p = d / "m.csv"
    p.write_bytes(b"path,report,split,id\n" + b"".join(lines))
    return p


def _row(i: int, split: str = "train", report: str | None = None) -> bytes:
    return f"v{i}.nii.gz,{report or f'{REPORT} Item {i}.'},{split},k{i}\n".encode()


@pytest.mark.parametrize("split", ["../victim", "/../../x/victim", "train/sub", ".hidden", "a.b"])
def test_split_names_cannot_leave_out_or_break_names(tmp_path: Path, split: str) -> None:
    _vols(tmp_path, 3)
    victim = tmp_path / "victim-000000.tar"
    victim.write_bytes(b"precious")
    m = _write(tmp_path, [_row(0), _row(1, split=split), _row(2)])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad_name: .*m.csv \[key k1\]: line 3: split"):
        write_shards(m, out, hr_size=(4, 4, 4), progress=False)
    index = write_shards(m, out, hr_size=(4, 4, 4), on_error="skip", progress=False)
    assert victim.read_bytes() == b"precious"
    outside = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out}
    assert outside == {tmp_path / "m.csv", victim, *(tmp_path / f"v{i}.nii.gz" for i in range(3))}
    assert index["summary"]["dropped"] == {"bad_name": 1} and sorted(ShardSet(out).keys()) == ["k0", "k2"]
    assert verify_shards(out)["ok"]


def test_ids_must_be_safe_names(tmp_path: Path) -> None:
    _vols(tmp_path, 2)
    m = _write(tmp_path, [_row(0), b"v1.nii.gz,Report,train,../../evil\n"])
    with pytest.raises(DataError, match=r"bad_name: .*m.csv \[key .*\]: line 3: id '../../evil'"):
        manifest_records(m)


def test_unterminated_quote_loses_no_row_and_names_it(tmp_path: Path) -> None:
    _vols(tmp_path, 5)
    lines = [
        _row(0),
        f'v1.nii.gz,"{REPORT} A quote that never closes.,train,k1\n'.encode(),
        _row(2),
        _row(3),
        f'v4.nii.gz,"{REPORT}\nSecond line, quoted: a legal multi-line report.",train,k4\n'.encode(),
    ]
    m = _write(tmp_path, lines)
    with pytest.raises(
        DataError, match=r"unterminated_quote: .*m.csv \[key k1\]: line 3: .*into line 4, which is a row"
    ):
        manifest_records(m)
    recs, summary = manifest_records(m, on_error="skip")
    assert [r.key for r in recs] == ["k0", "k2", "k3", "k4"]
    assert summary.dropped == {"unterminated_quote": 1} and summary.found == 5
    assert recs[1].report == f"{REPORT} Item 2." and "k3" not in recs[1].report
    assert recs[3].report == f"{REPORT}\nSecond line, quoted: a legal multi-line report."
    # A quote left open on the last row runs to the end of the file: named, the rows before kept.
    m = _write(tmp_path, [_row(0), b'v1.nii.gz,"open to the end,train,k1\n'])
    recs, summary = manifest_records(m, on_error="skip")
    assert [r.key for r in recs] == ["k0"] and "end of the file" in summary.errors[0]


def test_non_utf8_row_costs_that_row_only(tmp_path: Path) -> None:
    _vols(tmp_path, 3)
    m = _write(tmp_path, [_row(0), b"v1.nii.gz,Caf\xe9 " + REPORT.encode() + b",train,k1\n", _row(2)])
    with pytest.raises(DataError, match=r"not_utf8: .*m.csv \[key k1\]: line 3: byte 0xe9"):
        manifest_records(m)
    index = write_shards(m, tmp_path / "o", hr_size=(4, 4, 4), on_error="skip", progress=False)
    assert index["summary"]["dropped"] == {"not_utf8": 1} and sorted(ShardSet(tmp_path / "o").keys()) == [
        "k0",
        "k2",
    ]
    assert index["summary"]["found"] == 3 and index["summary"]["written"] == 2


def test_row_with_wrong_field_count_is_named(tmp_path: Path) -> None:
    _vols(tmp_path, 2)
    m = _write(tmp_path, [_row(0), f"v1.nii.gz,{REPORT}, with a comma,train,k1\n".encode()])
    with pytest.raises(DataError, match=r"bad_row: .*m.csv \[key .*\]: line 3: 5 fields, the header has 4"):
        manifest_records(m)


def test_manifest_without_usable_rows_fails_loudly(tmp_path: Path, capsys) -> None:
    from shards.write import main

    m = _write(tmp_path, [])
    with pytest.raises(DataError, match=r"no_samples: .*m.csv .*found 0"):
        write_shards(m, tmp_path / "o", hr_size=(4, 4, 4), progress=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--manifest", str(m), "--out", str(tmp_path / "o"), "--hr-size", "4,4,4", "--no-progress"])
    assert exit_.value.code == 1 and "no_samples" in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.json").exists()
