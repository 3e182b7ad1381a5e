"""Imports go one way: kernels <- monet_runtime <- masks <- server; monet_cli composes them."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"kernels", "monet_runtime", "masks", "server", "monet_cli"}

# package -> project packages and heavy libraries it must not import
FORBIDDEN = {
    "kernels": PROJECT - {"kernels"} | {"safetensors", "fastapi", "redis"},
    "monet_runtime": {"masks", "server", "monet_cli", "fastapi", "redis"},
    "masks": {"server", "monet_cli", "fastapi", "triton", "kernels"},
    "server": {"monet_cli", "torch", "triton", "kernels"},
    "training": {"server", "monet_cli", "fastapi"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN[package]) for f in files
    }
    assert {f: bad for f, bad in offenders.items() if bad} == {}


@pytest.mark.parametrize("module", ["server.main", "masks.store", "masks.cache", "masks.schema"])
def test_the_server_and_the_mask_store_load_no_torch(module):
    """The static check above sees direct imports only; this one follows every import chain
    (masks.schema -> monet_runtime.expert_mask once pulled the whole runtime in)."""
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('torch', 'triton', 'numba', 'vllm', 'kernels')"
            " if m in sys.modules)\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
