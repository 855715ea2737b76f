"""Strict export loading (issue 23, case 5): a broken or partial export is an error naming the
file and the first bad keys, never a model that writes empty or gibberish reports."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hilt_scale.model.config import model_config
from hilt_scale.model.export import load_export, save_export
from hilt_scale.model.mllm import build_model, build_tokenizer

REPORTS = ["Findings: The heart is normal in size. No pleural effusion.", "Mild emphysema in both lungs."]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    cfg = model_config(llm="llm-micro", resolution="cpu-micro")
    torch.manual_seed(0)
    model = build_model(cfg, build_tokenizer(cfg, texts=REPORTS * 10))
    out = tmp_path_factory.mktemp("export") / "export"
    save_export(model, out)
    load_export(out)  # the intact export loads
    return out


def _broken(export: Path, tmp_path: Path, rel: str, edit) -> tuple[Path, Path]:
    dst = tmp_path / "export"
    shutil.copytree(export, dst)
    path = dst / rel
    edit(path)
    return dst, path


def _drop_first(path: Path) -> None:
    state = load_file(path)
    first = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != first}, path)


def _nan(path: Path) -> None:
    state = load_file(path)
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, path)


@pytest.mark.parametrize(
    ("rel", "edit", "message"),
    [
        ("adapter/adapter_model.safetensors", lambda p: p.write_bytes(b""), "unreadable"),
        ("adapter/adapter_model.safetensors", _drop_first, "missing 1 tensor"),
        ("llm_base/model.safetensors", _drop_first, "missing 1 tensor"),
        ("vision.safetensors", _nan, "non-finite values in 1 tensor"),
        (
            "llm_base/model.safetensors",
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            "unreadable",
        ),
    ],
)
def test_a_broken_export_is_refused_naming_file_and_keys(export, tmp_path, rel, edit, message):
    dst, path = _broken(export, tmp_path, rel, edit)
    with pytest.raises((ValueError, KeyError)) as e:
        load_export(dst)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_generate_refuses_batch_zero_before_loading_anything(tmp_path, capsys):
    """Minor case: `generate --batch 0` raised a raw error from deep inside."""
    from hilt_scale.generate import main

    with pytest.raises(SystemExit) as e:
        main(["--run", str(tmp_path / "no-run"), str(tmp_path), "--batch", "0"])
    assert e.value.code == 2 and "--batch must be at least 1" in capsys.readouterr().err
