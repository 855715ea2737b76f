"""The package layout's rules: one-way imports, no shadowing names, no sys.path surgery, triton optional."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("hilt_scale", "shards", "hilt_kernels")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_sys_path_manipulation():
    offenders = [
        str(p.relative_to(ROOT)) for pkg in PACKAGES for p in _modules(pkg) if "sys.path" in p.read_text()
    ]
    assert offenders == []


def test_imports_run_one_way():
    for path in _modules("shards"):
        bad = {m for m in _imported(path) if m.split(".")[0] in ("hilt_scale", "hilt_kernels")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        if path.stem not in ("phantom", "phantom_report"):
            phantom = {m for m in _imported(path) if m.startswith("shards.phantom")}
            assert not phantom, f"real-data module {path.name} imports the phantom"
    for path in _modules("hilt_kernels"):
        bad = {m for m in _imported(path) if m.split(".")[0] == "hilt_scale"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def _installed_top_level_names() -> dict[str, str]:
    """Import name -> distribution, for every installed distribution but our own.

    A distribution's import names come from its ``top_level.txt`` where it has one, and from the
    packages (``NAME/__init__.py``) and modules (``NAME.py``) its RECORD lists: Hugging Face's
    ``kernels`` has no top_level.txt, only its files.
    """
    names: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"] or ""
        if dist_name.lower().replace("_", "-") == "hilt-scale":
            continue
        top = {line.strip() for line in (dist.read_text("top_level.txt") or "").splitlines()}
        for f in dist.files or []:
            parts = Path(str(f)).parts
            if len(parts) == 2 and parts[1] == "__init__.py":
                top.add(parts[0])
            elif len(parts) == 1 and parts[0].endswith(".py"):
                top.add(parts[0][:-3])
        top.add(dist_name.replace("-", "_").lower())
        names.update({n: dist_name for n in top if n and not n.startswith(("_", "."))})
    return names


def test_no_top_level_package_of_ours_shadows_an_installed_distribution():
    """Our packages sit first on sys.path from the repo root: one named like another import wins."""
    installed = _installed_top_level_names()
    assert "transformers" in installed  # the scan sees installed packages at all
    clashes = {p: installed[p] for p in PACKAGES if p in installed}
    assert clashes == {}, f"packages of ours named like installed distributions' modules: {clashes}"


def test_no_module_shadows_the_standard_library_or_a_dependency():
    """`python hilt_scale/train.py` puts hilt_scale/ first on sys.path: its names must be unique."""
    taken = set(sys.stdlib_module_names) | set(_installed_top_level_names())
    for path in (ROOT / "hilt_scale").iterdir():
        name = path.stem if path.suffix == ".py" else path.name
        if path.name.startswith(("_", ".")) or not (path.suffix == ".py" or path.is_dir()):
            continue
        assert name not in taken, f"hilt_scale/{path.name} shadows the module {name!r}"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_model_builds_and_trains_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
from hilt_scale.model.config import model_config
from hilt_scale.model.mllm import build_model
import hilt_kernels
assert not hilt_kernels.triton_available()
for impl in ("eager", "sdpa", "triton"):
    cfg = model_config(llm="llm-micro", resolution="cpu-micro", overrides={"connector.attn_impl": impl})
    model = build_model(cfg, texts=["no effusion.", "a small nodule."])
    batch = model.collator()([{"key": "a", "hr": torch.zeros(16, 32, 32, dtype=torch.uint8), "report": "no effusion."}])
    model(batch).backward()
print("ok")
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    # peft imports bitsandbytes, whose probe for a hub kernel fails here: that warning stays out.
    assert "kernels-community" not in proc.stderr


COMMANDS = [
    ["hilt_scale/train.py"],
    ["-m", "hilt_scale.train"],
    *[["-m", f"hilt_scale.{name}"] for name in ("score", "info", "labeler", "generate", "bench_step")],
    ["-m", "hilt_scale.sweep"],
    ["-m", "hilt_scale.sweep.probe"],
    ["-m", "hilt_kernels.bench"],
    *[["-m", f"shards.{name}"] for name in ("write", "verify", "bench", "preview", "phantom")],
]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_every_command_answers_help_from_the_repo_root_and_from_elsewhere(where, tmp_path):
    """Each CLI starts (imports everything it needs) wherever it is run from, beside Hugging Face's
    `kernels` package that transformers requires. The train script is given by path as a user
    (and the deepspeed launcher) would: relative from the root, absolute from elsewhere."""
    cwd = ROOT if where == "repo-root" else tmp_path
    for cmd in COMMANDS:
        if cmd[0].endswith(".py"):
            cmd = [str(ROOT / cmd[0]) if where == "elsewhere" else cmd[0], *cmd[1:]]
        proc = subprocess.run(
            [sys.executable, *cmd, "--help"], cwd=cwd, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, f"{' '.join(cmd)} from {where}: {proc.stderr[-2000:]}"
        assert "usage" in proc.stdout.lower(), f"{' '.join(cmd)} from {where}: {proc.stdout[-500:]}"
        if "train" in cmd[-1]:
            assert "phantom-cpu" in proc.stdout and "ctrate-llama3-70b-qlora" in proc.stdout


_KERNEL_LOOKUP = """
import sys
{path_setup}
import hilt_kernels
from hilt_scale.model.attention import triton_kernel_function
fn = triton_kernel_function()
assert fn is hilt_kernels.hilt_attention, fn
assert fn.__module__ == "hilt_kernels", fn.__module__
assert hilt_kernels.__file__.endswith("hilt_kernels/__init__.py"), hilt_kernels.__file__
print("ok")
"""


@pytest.mark.parametrize("mode", ["module", "script"])
def test_the_trainers_triton_kernel_is_ours_in_both_launch_modes(mode, tmp_path):
    """`-m hilt_scale.train` puts the working directory first on sys.path; `deepspeed
    hilt_scale/train.py` puts hilt_scale/ there instead. Either way the kernel the model picks is
    our hilt_kernels.hilt_attention, never a lookalike from Hugging Face's `kernels`."""
    import os

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path_setup = f"sys.path[0] = {str(ROOT / 'hilt_scale')!r}" if mode == "script" else ""
    code = _KERNEL_LOOKUP.format(path_setup=path_setup)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cwd = ROOT if mode == "module" else tmp_path
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
