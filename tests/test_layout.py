"""The house rules of the code layout, checked from the source with `ast` (see README "Layout")."""
from pathlib import Path

import pytest

from cxrsynth.deps import imports_of

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_LAYERS = ("cxrsynth.text", "cxrsynth.data", "cxrsynth.eval", "cxrsynth.models")


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "cxrsynth").rglob("*.py")):
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[mod.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _edges(all_imports: bool = False) -> dict[str, set[str]]:
    """module -> the package modules it imports (run-time imports; with all_imports, TYPE_CHECKING ones too)."""
    out = {}
    for mod, path in MODULES.items():
        names = imports_of(path, mod) if not all_imports else _all_imports(path, mod)
        out[mod] = {n for n in names if n in MODULES and n != mod}
    return out


def _all_imports(path: Path, mod: str) -> set[str]:
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _in(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_no_import_cycles():
    edges = _edges()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if _in(m, n) and MODULES[n].name == "__init__.py":
                continue  # a package's own __init__ runs first anyway
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_library_never_imports_a_stage_module():
    for mod, names in _edges(all_imports=True).items():
        if _in(mod, "cxrsynth.stages"):
            continue
        bad = sorted(n for n in names if _in(n, "cxrsynth.stages") or n == "stages" or n.startswith("stages."))
        assert not bad, f"{mod} imports stage modules {bad}"


@pytest.mark.parametrize("layer,forbidden", [
    ("cxrsynth.text", ("cxrsynth.data", "cxrsynth.models", "cxrsynth.eval", "cxrsynth.pipeline")),
    ("cxrsynth.data", ("cxrsynth.models", "cxrsynth.eval", "cxrsynth.pipeline", "cxrsynth.keypatches")),
    ("cxrsynth.eval", ("cxrsynth.models", "cxrsynth.pipeline")),
])
def test_layers_import_downwards_only(layer, forbidden):
    """text < data < eval < models < pipeline < stages (at run time; type hints may name a higher layer)."""
    for mod, names in _edges().items():
        if _in(mod, layer):
            bad = sorted(n for n in names if any(_in(n, f) for f in forbidden))
            assert not bad, f"{mod} imports {bad}"


def test_library_never_reads_params_yaml():
    """Only stage modules (and the command line) call stage_params / load_params."""
    for mod, path in MODULES.items():
        if any(_in(mod, layer) for layer in LIBRARY_LAYERS) and not mod.endswith("config"):
            src = path.read_text()
            assert "stage_params(" not in src and "load_params(" not in src, mod


def test_every_stage_has_one_module_and_a_thin_entry():
    import yaml
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert (ROOT / "cxrsynth" / "stages" / f"{name}.py").is_file(), name
        entry = (ROOT / "stages" / f"{name}.py").read_text()
        assert f"from cxrsynth.stages.{name} import main" in entry and len(entry.splitlines()) <= 8, name


def test_no_two_modules_differ_only_by_form():
    """prompts / prompting, evaluate / eval, synthesis / synthesize, sampler / sampling: one stem, one module
    (stage modules aside)."""
    def stem(name: str) -> str:
        for suffix in ("ing", "ion", "ize", "ate", "ers", "er", "s", "e"):
            if name.endswith(suffix) and len(name) > len(suffix) + 3:
                return name[: -len(suffix)]
        return name
    seen: dict[str, str] = {}
    for mod in MODULES:
        if _in(mod, "cxrsynth.stages"):
            continue
        leaf = mod.rsplit(".", 1)[-1]
        if leaf.startswith("_"):
            continue
        s = stem(leaf)
        assert seen.get(s, leaf) == leaf, f"{seen[s]} and {leaf} differ only by form"
        seen[s] = leaf


def test_files_stay_short_unless_listed_as_cohesive():
    cohesive = {"cxrsynth/data/phantom/render.py", "cxrsynth/data/phantom/reports.py", "cxrsynth/data/dicom.py",
                "cxrsynth/text/findings.py"}  # each one thing; see README "Layout"
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text().splitlines())
        assert n <= 800 or rel in cohesive, f"{rel}: {n} lines"
