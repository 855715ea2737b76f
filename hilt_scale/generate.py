"""Write reports for CT volumes with a trained run's export, without DeepSpeed.

    python -m hilt_scale.generate --run RUNDIR INPUT [--out PREFIX] [--split valid]

INPUT is a NIfTI file, a directory of NIfTI files (searched recursively) or a shard set (a
directory with index.json). NIfTI volumes go through the same preprocessing as ingestion
(canonical orientation, HU window, resize to the model's HR size). Output: PREFIX.jsonl (key,
generated, and reference where the input has one) and PREFIX.txt (readable), each report
appended (and fsynced) as soon as it is made. A volume that cannot be read is skipped and named
at the end, and the command then exits non-zero; the reports of the good volumes are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.batch import stack_batch

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """True for .nii and .nii.gz files."""
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_key(path: Path) -> str:
    """Volume id of a NIfTI file: its name without .nii / .nii.gz."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_nifti(
    path: Path, hr_size: tuple[int, int, int], target_spacing: tuple[float, float, float] | None = None
) -> np.ndarray:
    """One NIfTI preprocessed exactly as ingestion does: uint8 (D, H, W) at ``hr_size``.

    ``target_spacing`` (the training shards' ``preprocessing.target_spacing``, e.g. the paper's
    384 mm field of view) resamples to that spacing and centre-crops/pads; None stretches to the grid.
    """
    from shards.ingest import Record, load_canonical, preprocess

    rec = Record(key=nifti_key(path), path=path, report="", split="", dataset="nifti")
    hu, spacing = load_canonical(rec)
    arr, _ = preprocess(hu, spacing, tuple(hr_size), "uint8", target_spacing)
    return arr


def input_batches(
    source: str | Path,
    hr_size: tuple[int, int, int],
    batch: int,
    split: str,
    failures: list[str] | None = None,
    target_spacing: tuple[float, float, float] | None = None,
) -> Iterator[dict]:
    """Batches {"key", "hr" [B, 1, D, H, W], "report"} from a shard set, a NIfTI file or a NIfTI directory.

    With a ``failures`` list, a volume that cannot be read is left out and described there (file
    and error); without one the first such volume raises.
    """
    source = Path(source)
    if (source / "index.json").exists():
        from shards.read import ShardLoader

        policy = "raise" if failures is None else "skip"
        loader = ShardLoader(source, split=split, batch_size=batch, shuffle=False, on_error=policy)
        if list(loader.shard_set.hr_size) != list(hr_size):
            raise ValueError(
                f"{source / 'index.json'}: hr_size {loader.shard_set.hr_size} differs from the model's {list(hr_size)}"
            )
        yield from (b for b in loader if len(b["key"]))
        if failures is not None and loader.skipped:
            failures.extend(loader.skipped_messages)
            hidden = sum(loader.skipped.values()) - len(loader.skipped_messages)
            if hidden > 0:
                failures.append(f"... and {hidden} more unreadable volumes in {source}")
        return
    if source.is_file():
        if not is_nifti(source):
            raise ValueError(f"{source}: not a NIfTI file (.nii / .nii.gz) or a shard set")
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and is_nifti(p))
        if not files:
            raise FileNotFoundError(f"{source}: no .nii / .nii.gz files and no index.json")
    else:
        raise FileNotFoundError(f"{source} does not exist")
    for i in range(0, len(files), batch):
        vols = []
        for path in files[i : i + batch]:
            try:
                vols.append({"key": nifti_key(path), "hr": load_nifti(path, hr_size, target_spacing)})
            except Exception as exc:
                if failures is None:
                    raise
                failures.append(f"{path}: {type(exc).__name__}: {exc}")
        if vols:
            yield stack_batch(vols)


def generate_reports(
    model: Any,
    source: str | Path,
    batch: int = 4,
    split: str = "valid",
    max_new_tokens: int = 160,
    num_beams: int = 1,
    failures: list[str] | None = None,
    on_records: Callable[[list[dict]], None] | None = None,
    target_spacing: tuple[float, float, float] | None = None,
) -> list[dict]:
    """Records {key, generated[, reference]} for every readable volume of ``source``.

    ``on_records`` receives each batch's records as soon as they are made; ``failures`` (see
    ``input_batches``) collects the volumes that could not be read instead of raising.
    """
    hr_size = tuple(model.cfg.resolution.hr_size)
    records = []
    for b in input_batches(source, hr_size, batch, split, failures, target_spacing):
        texts = model.generate(b["hr"], max_new_tokens=max_new_tokens, num_beams=num_beams)
        made = [
            {"key": key, **({"reference": ref} if ref is not None else {}), "generated": text}
            for key, ref, text in zip(b["key"], b["report"], texts)
        ]
        if on_records is not None:
            on_records(made)
        records += made
    return records


class Appender:
    """Append text to a file as it comes: one write per batch, flushed and fsynced.

    The file is created empty first, so it never mixes runs; a crash loses at most the batch
    being written, never the reports before it.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, text: str) -> None:
        try:
            self.f.write(text)
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as exc:
            raise OSError(exc.errno, f"{self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self.f.close()


def load_run(run: str | Path) -> tuple[Any, dict]:
    """The exported model of a run directory (no DeepSpeed) and the run's training config."""
    from hilt_scale.model.export import load_export

    export = Path(run) / "export"
    if not (export / "config.json").exists():
        raise FileNotFoundError(
            f"{export}/config.json is missing: did the run finish (the export is written last)?"
        )
    model = load_export(export)
    model.eval()
    train_cfg_path = export / "train_config.json"
    train_cfg = json.loads(train_cfg_path.read_text()) if train_cfg_path.exists() else {}
    prep_path = export / "preprocessing.json"  # the training shards' preprocessing (absent: stretch)
    train_cfg["preprocessing"] = json.loads(prep_path.read_text()) if prep_path.exists() else {}
    return model, train_cfg


def main(argv: list[str] | None = None) -> None:
    """CLI: generate reports for INPUT with RUNDIR's export; write PREFIX.jsonl and PREFIX.txt."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (its export/ is loaded)")
    p.add_argument("input", help="NIfTI file, directory of NIfTI files, or shard set")
    p.add_argument("--out", help="output prefix (default RUNDIR/generated/<input name>)")
    p.add_argument("--split", default="valid", help="split of a shard set (default valid)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, help="default: the run's --max-new-tokens")
    p.add_argument("--num-beams", type=int, help="default: the run's --num-beams")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")

    torch.manual_seed(0)
    model, train_cfg = load_run(args.run)
    max_new = args.max_new_tokens or train_cfg.get("max_new_tokens", 160)
    beams = args.num_beams or train_cfg.get("num_beams", 1)
    name = nifti_key(Path(args.input)) if Path(args.input).is_file() else Path(args.input).name
    prefix = Path(args.out) if args.out else Path(args.run) / "generated" / name
    jsonl = Appender(prefix.with_name(prefix.name + ".jsonl"))
    txt = Appender(prefix.with_name(prefix.name + ".txt"))

    def keep(made: list[dict]) -> None:
        jsonl.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in made))
        txt.write("".join(f"== {r['key']} ==\n{r['generated']}\n\n" for r in made))

    failures: list[str] = []
    try:
        spacing = train_cfg["preprocessing"].get("target_spacing")
        records = generate_reports(
            model, args.input, args.batch, args.split, max_new, beams, failures, keep,
            tuple(spacing) if spacing else None,
        )  # fmt: skip
    finally:
        jsonl.close()
        txt.close()
    print(f"{len(records)} reports -> {prefix}.jsonl, {prefix}.txt")
    if failures:
        print(f"{len(failures)} volume(s) could not be read and have no report:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
