"""Write reports for CT volumes with a trained run's export, without DeepSpeed.

    python -m hilt_scale.generate --run RUNDIR INPUT [--out PREFIX] [--split valid]

INPUT is a NIfTI file, a directory of NIfTI files (searched recursively) or a shard set (a
directory with index.json). NIfTI volumes go through the same preprocessing as ingestion
(canonical orientation, HU window, resize to the model's HR size). Output: PREFIX.jsonl (key,
generated, and reference where the input has one) and PREFIX.txt (readable).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def load_nifti(path: Path, hr_size: tuple[int, int, int]) -> np.ndarray:
    """One NIfTI preprocessed exactly as ingestion does: uint8 (D, H, W) at ``hr_size``."""
    from shards.ingest import Record, load_canonical, preprocess

    rec = Record(key=nifti_key(path), path=path, report="", split="", dataset="nifti")
    hu, spacing = load_canonical(rec)
    arr, _ = preprocess(hu, spacing, tuple(hr_size), "uint8")
    return arr


def input_batches(
    source: str | Path, hr_size: tuple[int, int, int], batch: int, split: str
) -> Iterator[dict]:
    """Batches {"key", "hr" [B, 1, D, H, W], "report"} from a shard set, a NIfTI file or a NIfTI directory."""
    source = Path(source)
    if (source / "index.json").exists():
        from shards.read import ShardLoader

        loader = ShardLoader(source, split=split, batch_size=batch, shuffle=False)
        if list(loader.shard_set.hr_size) != list(hr_size):
            raise ValueError(
                f"{source / 'index.json'}: hr_size {loader.shard_set.hr_size} differs from the model's {list(hr_size)}"
            )
        yield from loader
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
        part = files[i : i + batch]
        vols = np.stack([load_nifti(p, hr_size) for p in part])
        yield {
            "key": [nifti_key(p) for p in part],
            "hr": torch.from_numpy(vols)[:, None],
            "report": [None] * len(part),
        }


def generate_reports(
    model: Any,
    source: str | Path,
    batch: int = 4,
    split: str = "valid",
    max_new_tokens: int = 160,
    num_beams: int = 1,
) -> list[dict]:
    """Records {key, generated[, reference]} for every volume of ``source``."""
    hr_size = tuple(model.cfg.resolution.hr_size)
    records = []
    for b in input_batches(source, hr_size, batch, split):
        texts = model.generate(b["hr"], max_new_tokens=max_new_tokens, num_beams=num_beams)
        for key, ref, text in zip(b["key"], b["report"], texts):
            records.append({"key": key, **({"reference": ref} if ref is not None else {}), "generated": text})
    return records


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
    return model, train_cfg


def main(argv: list[str] | None = None) -> None:
    """CLI: generate reports for INPUT with RUNDIR's export; write PREFIX.jsonl and PREFIX.txt."""
    from shards.io import write_jsonl_atomic, write_text_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (its export/ is loaded)")
    p.add_argument("input", help="NIfTI file, directory of NIfTI files, or shard set")
    p.add_argument("--out", help="output prefix (default RUNDIR/generated/<input name>)")
    p.add_argument("--split", default="valid", help="split of a shard set (default valid)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, help="default: the run's --max-new-tokens")
    p.add_argument("--num-beams", type=int, help="default: the run's --num-beams")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, train_cfg = load_run(args.run)
    max_new = args.max_new_tokens or train_cfg.get("max_new_tokens", 160)
    beams = args.num_beams or train_cfg.get("num_beams", 1)
    records = generate_reports(model, args.input, args.batch, args.split, max_new, beams)
    name = nifti_key(Path(args.input)) if Path(args.input).is_file() else Path(args.input).name
    prefix = Path(args.out) if args.out else Path(args.run) / "generated" / name
    write_jsonl_atomic(prefix.with_name(prefix.name + ".jsonl"), records)
    text = "".join(f"== {r['key']} ==\n{r['generated']}\n\n" for r in records)
    write_text_atomic(prefix.with_name(prefix.name + ".txt"), text)
    print(f"{len(records)} reports -> {prefix}.jsonl, {prefix}.txt")


if __name__ == "__main__":
    main()
