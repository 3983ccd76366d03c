"""The layers of the package, checked from the source: each module imports only what its layer may.

kernels and program import nothing of skimfx (leaves); passes never import runtime, recipes or
calibrate; runtime never imports passes, recipes, calibrate or capture; recipes never import runtime
or calibrate; nothing but the top (the package's __init__, cli, eval, integrations) imports calibrate.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "skimfx"

# layer -> the skimfx layers it must not import
FORBIDDEN = {
    "kernels": {"program", "capture", "passes", "runtime", "recipes", "calibrate", "models", "eval", "cli"},
    "program": {"kernels", "capture", "passes", "runtime", "recipes", "calibrate", "models", "eval", "cli"},
    "capture": {"passes", "runtime", "recipes", "calibrate", "eval", "cli"},
    "passes": {"runtime", "recipes", "calibrate", "eval", "cli"},
    "runtime": {"passes", "recipes", "calibrate", "capture", "eval", "cli"},
    "recipes": {"runtime", "calibrate", "eval", "cli"},
    "calibrate": {"eval", "cli"},
}


def layer_of(path: Path, root: Path) -> str:
    """The layer of a module: its first component under the package ("kernels", "program", ...)."""
    rel = path.relative_to(root).with_suffix("")
    return rel.parts[0]


def skimfx_imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported skimfx layer) for every import in ``path``, absolute or relative, including the
    ones inside functions and under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = path.relative_to(root).parent.parts           # the module's package, relative to skimfx
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[:len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
                mod = base + (node.module.split(".") if node.module else [])
                if not mod:                               # `from . import x` at the top: x are layers
                    out += [(node.lineno, a.name) for a in node.names]
                    continue
                out.append((node.lineno, mod[0]))
                continue
            names = [node.module or ""]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "skimfx" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        layer = layer_of(path, root)
        if layer == "__init__":
            continue                                      # the top wires everything
        for line, target in skimfx_imports(path, root):
            if target in FORBIDDEN.get(layer, ()):
                bad.append(f"{path.relative_to(root)}:{line}: {layer} imports {target}")
    return bad


def test_the_package_follows_the_import_rules():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("where, line", [
    ("runtime/engine.py", "from ..passes import kv_policy"),
    ("runtime/policies/quest.py", "from ...recipes import QuestPolicy"),
    ("recipes/kv.py", "from ..runtime.cache import KVCache"),
    ("recipes/exit.py", "    from ..calibrate import ExitCalibration"),
    ("passes/fuse.py", "import skimfx.runtime"),
    ("kernels/norm.py", "from ..program import Program"),
    ("program.py", "from .kernels import attention"),
])
def test_a_forbidden_import_is_reported(tmp_path, where, line):
    """The check fails when a forbidden import is added (to a copy of the package)."""
    import shutil

    root = tmp_path / "skimfx"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    target = root / where
    src = target.read_text()
    if line.startswith("    "):                           # inside a function, as lazy imports are
        src += "\n\ndef _lazy():\n" + line + "\n"
    else:
        src = line + "\n" + src
    target.write_text(src)
    bad = violations(root)
    assert len(bad) == 1 and bad[0].startswith(where), bad
