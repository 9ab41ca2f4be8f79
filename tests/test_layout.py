"""The package's shape: the stdlib queue stays unshadowed, and imports go one way only."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Which cimhes layers each layer may import (ARCHITECTURE.md, "Layers and the one direction").
ALLOWED = {
    "xsd": set(),
    "cim": {"xsd"},
    "drivers": {"cim", "xsd"},
    "engine": {"drivers", "cim", "xsd"},
    "endpoints": {"engine", "drivers", "cim", "xsd", "fixtures", "queue"},
    "queue": {"engine", "drivers", "cim", "xsd"},
    "fixtures": set(),
}


def test_import_queue_from_the_repository_root_is_the_standard_library():
    out = subprocess.run(
        [sys.executable, "-c", "import queue, sys; print(queue.__file__); print(queue.Queue)"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert not out[0].startswith(str(ROOT)), out[0]
    assert "queue.py" in out[0]
    assert not (ROOT / "queue" / "__init__.py").exists()


def test_top_level_folders_are_cimhes_subpackages():
    import cimhes.cim
    import cimhes.drivers
    import cimhes.endpoints
    import cimhes.engine
    import cimhes.fixtures
    import cimhes.xsd

    for module, folder in [(cimhes.cim, "cim"), (cimhes.drivers, "drivers"),
                           (cimhes.endpoints, "endpoints"), (cimhes.engine, "engine"),
                           (cimhes.fixtures, "fixtures"), (cimhes.xsd, "xsd")]:
        assert Path(module.__file__).resolve().parent == ROOT / folder


def _cimhes_imports(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "cimhes":
            names = [f"cimhes.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cimhes" and len(parts) > 1:
                layers.add(parts[1])
    return layers


def test_layers_import_only_downward():
    offences = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for used in _cimhes_imports(path) - allowed - {layer}:
                offences.append(f"{path.relative_to(ROOT)} imports cimhes.{used}")
    assert offences == []
