"""CSV reading one record at a time, for manifests and CT-RATE's CSVs (docs/DATA.md, "CSV rule").

A bad record (non-UTF-8 bytes, a quote that never closes, the wrong number of fields) costs that
record only: it becomes a ``DataError`` naming file, line and key, and reading goes on.
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shards.ingest import DataError


def _fields(text: str) -> list[str]:
    """The fields of one CSV record given as text (empty list for a blank line)."""
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0] if rows else []


def _open_quote(text: str) -> bool:
    """True when a quoted field of this CSV text is still open at its end."""
    try:
        list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error as e:  # a field past csv's size limit is a quote that swallowed the file
        return "unexpected end of data" in str(e) or "field larger than field limit" in str(e)
    return False


def _looks_like_row(text: str, header: list[str], key_column: str) -> bool:
    """A line that is a whole CSV record by itself, with the header's width and a volume name in key_column."""
    if _open_quote(text):
        return False
    fields = _fields(text)
    if len(fields) != len(header):
        return False
    name = fields[header.index(key_column)].strip().lower()
    return name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"))


def _guess_row(text: str, header: list[str]) -> dict:
    """The row as well as it can be told, to name a bad record: a record whose quote never closes is
    cut at commas, the fields before the open quote read from the left and the rest from the right."""
    if not _open_quote(text):
        with contextlib.suppress(csv.Error):
            return dict(zip(header, _fields(text)))
    naive = text.splitlines()[0].split(",") if text.strip() else []
    q = next((i for i, f in enumerate(naive) if f.startswith('"')), len(naive))
    right = len(header) - q - 1
    if q >= len(header) or right < 0 or len(naive) < len(header):
        return dict(zip(header, naive))
    return {**dict(zip(header[:q], naive[:q])), **dict(zip(header[q + 1 :], naive[len(naive) - right :]))}


def read_csv_rows(
    path: str | Path, required: tuple[str, ...], key_column: str, key_of=None
) -> tuple[list[tuple[int, dict]], list[DataError]]:
    """Read a CSV one record at a time: ([(line, row)], [DataError of each bad record]).

    Each record is decoded on its own, so a non-UTF-8 byte costs that record only (``not_utf8``,
    naming the line). A quoted field that is never closed would swallow the rows after it into one
    report (the csv module reads on to the next quote or the end of the file): a record that runs
    over a line which is a whole row by itself (the header's width, a volume file name in
    ``key_column``) is refused as ``unterminated_quote`` and reading restarts at that line, so the
    rows after it are kept. A record with more or fewer fields than the header is ``bad_row``.
    A missing required column or an undecodable header raises ``bad_csv`` for the whole file.
    """
    from shards.ingest import DataError, safe_key  # shards.ingest imports this module

    path = Path(path)
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except OSError as e:
        raise DataError("missing_file", path, "-", f"cannot read the CSV: {e}") from e
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]  # UTF-8 byte order mark
    try:
        header = [h.strip() for h in _fields(lines[0].decode("utf-8"))] if lines else []
    except UnicodeDecodeError as e:
        raise DataError(
            "bad_csv", path, "-", f"line 1 (header) is not UTF-8 ({e.reason} at byte {e.start})"
        ) from e
    missing = [c for c in (*required, key_column) if c not in header]
    if missing:
        raise DataError("bad_csv", path, "-", f"missing column(s) {missing}; has {header}")
    key_of = key_of or (lambda row: str(row.get(key_column, "")))
    rows: list[tuple[int, dict]] = []
    bad: list[DataError] = []
    i = 1
    while i < len(lines):
        start, buf = i + 1, lines[i]
        i += 1
        text = buf.decode("utf-8", "replace")
        if not text.strip():
            continue
        stopped_at, still_open = None, _open_quote(text)
        raw_parts, text_parts = [buf], [text]
        while still_open and i < len(lines):
            nxt = lines[i].decode("utf-8", "replace")
            if _looks_like_row(nxt, header, key_column):
                stopped_at = i + 1
                break
            raw_parts.append(lines[i])
            text_parts.append(nxt)
            i += 1
            if nxt.count('"') % 2:  # only a line with an odd number of quotes can close the field
                still_open = _open_quote("".join(text_parts))
        buf, text = b"".join(raw_parts), "".join(text_parts)
        guess = _guess_row(text, header)
        try:
            key = safe_key(key_of(guess)) or "-"
        except Exception:  # a guess for the message only
            key = "-"
        where = f"line {start}"
        if _open_quote(text):
            tail = (
                f"into line {stopped_at}, which is a row of its own"
                if stopped_at
                else "to the end of the file"
            )
            bad.append(DataError("unterminated_quote", path, key, f"{where}: a quoted field runs on {tail}"))
            continue
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(
                DataError(
                    "not_utf8", path, key, f"{where}: byte 0x{buf[e.start]:02x} is not UTF-8 ({e.reason})"
                )
            )
            continue
        try:
            fields = _fields(text)
        except csv.Error as e:
            bad.append(DataError("bad_row", path, key, f"{where}: {e}"))
            continue
        if len(fields) != len(header):
            bad.append(
                DataError(
                    "bad_row", path, key, f"{where}: {len(fields)} fields, the header has {len(header)}"
                )
            )
            continue
        rows.append((start, dict(zip(header, fields))))
    return rows, bad
