"""The package's folders are its architecture: each imports only the folders below it, and the
decoders run without Lightning, ``datasets`` or the data side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lgen

PACKAGE = Path(lgen.__file__).parent
# what each part of lgen may import from lgen (the top-level modules - cli, predict, module, api,
# options, interrupt - may import anything)
ALLOWED = {
    "batch": {"errors"},
    "errors": set(),
    "kernels": {"errors"},
    "hf": {"errors"},
    "decode": {"batch", "kernels", "hf", "errors"},
    "data": {"batch", "output", "errors"},
    "output": {"decode", "errors"},
}


def _part(module: str) -> str:
    """``lgen.decode.steppers`` -> ``decode``; ``lgen.batch`` -> ``batch``."""
    return module.split(".")[1]


def _lgen_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lgen":
            if node.module == "lgen":  # from lgen import x: the submodule x
                found |= {f"lgen.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lgen"}
    return {m for m in found if m != "lgen"}


def test_each_folder_imports_only_the_folders_below_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "lgen." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        part = _part(module) if module.count(".") > 1 or module.split(".")[1] in ALLOWED else None
        if part is None or part not in ALLOWED:
            continue
        for imported in _lgen_imports(path):
            target = _part(imported)
            if target != part and target not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {imported}")
    assert not wrong, wrong
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {"data", "decode", "hf", "kernels", "output"}


def test_the_decoders_import_no_lightning_datasets_or_data_side():
    code = ("import sys\n"
            "import lgen.decode, lgen.decode.steppers, lgen.decode.budget, lgen.kernels, lgen.batch\n"
            "heavy = ('lightning', 'pytorch_lightning', 'datasets', 'deepspeed', 'peft')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
            "             or m.startswith(('lgen.data', 'lgen.output', 'lgen.module', 'lgen.predict'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
