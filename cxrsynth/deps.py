"""Which package modules a stage imports (transitively), and the dvc.yaml deps written from them.

Each stage of dvc.yaml depends on `stages/<name>.py` and on every non-empty `cxrsynth` module its run can import:
found from the source with `ast` (imports inside functions count, imports under `if TYPE_CHECKING:` do not, since
they never run). Folders are not used as deps: a folder dep re-runs a stage for an edit to any module in it, and a
stage like codebook would retrain the VQ-GAN for an edit to the DICOM reader.

    python -m cxrsynth.deps --check    # exit 1 naming each stale stage (the test suite runs the same check)
    python -m cxrsynth.deps --write    # rewrite the module lines of every stage's deps in dvc.yaml, in place

Only the module lines (`- stages/...`, `- cxrsynth/...`) of each `deps:` list are rewritten; data deps, comments and
everything else in dvc.yaml stay as they are.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

MODULE_LINE = re.compile(r"^(\s+)- ((?:stages|cxrsynth)/\S+)\s*$")


def module_file(root: Path, module: str) -> Path | None:
    """The source file of a dotted module name inside the repo (package __init__ or module.py), if any."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def _walk_runtime(tree: ast.AST):
    """ast.walk without the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, module: str) -> set[str]:
    """Dotted names a module imports at run time (`from a import b` gives both `a` and `a.b`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return found


def local_imports(root: Path, entry: str, package: str = "cxrsynth") -> set[Path]:
    """Repo-relative files of every `package` module reachable by run-time imports from the module `entry`."""
    root = Path(root)
    seen: set[str] = set()
    todo = [entry]
    files: set[Path] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        f = module_file(root, mod)
        if f is None:
            continue
        files.add(f.relative_to(root))
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(m for m in imports_of(f, mod) if m == package or m.startswith(package + "."))
    return {f for f in files if f.parts[0] == package}


def stage_modules(root: Path, name: str) -> list[str]:
    """The module deps of stage `name`: its entry file first, then every non-empty package module it imports
    (empty package markers carry no logic, and DVC warns about empty deps), sorted."""
    root = Path(root)
    mods = sorted(p.as_posix() for p in local_imports(root, f"stages.{name}") if (root / p).read_text().strip())
    return [f"stages/{name}.py", *mods]


def rewrite(text: str, modules: dict[str, list[str]]) -> str:
    """dvc.yaml text with each stage's module dep lines replaced by `modules[stage]` (at the first one's place)."""
    lines = text.splitlines()
    out: list[str] = []
    stage = None
    in_deps = placed = False
    for line in lines:
        m_stage = re.match(r"^  ([A-Za-z0-9_-]+):\s*$", line)
        if m_stage:
            stage, in_deps, placed = m_stage.group(1), False, False
        elif re.match(r"^    deps:\s*$", line):
            in_deps, placed = True, False
        elif re.match(r"^    \S", line):
            in_deps = False
        m = MODULE_LINE.match(line) if in_deps and stage in modules else None
        if m:
            if not placed:
                out.extend(f"{m.group(1)}- {p}" for p in modules[stage])
                placed = True
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def expected(root: Path, dvc_yaml: Path) -> tuple[str, str]:
    """(dvc.yaml as it is, as `--write` would make it)."""
    text = dvc_yaml.read_text(encoding="utf-8")
    stages = yaml.safe_load(text)["stages"]
    return text, rewrite(text, {name: stage_modules(root, name) for name in stages})


def stale_stages(root: Path, dvc_yaml: Path) -> list[str]:
    """Stages whose module deps in dvc.yaml differ from what their imports give."""
    root = Path(root)
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    out = []
    for name, stage in stages.items():
        have = [d for d in stage.get("deps", []) if MODULE_LINE.match(f"  - {d}")]
        if have != stage_modules(root, name):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrsynth.deps", description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml's module deps are stale")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's module deps from the imports")
    ap.add_argument("--root", default=".", help="repository root (default: .)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    dvc_yaml = root / "dvc.yaml"
    if args.write:
        text, new = expected(root, dvc_yaml)
        if new != text:
            dvc_yaml.write_text(new, encoding="utf-8")
        print(f"{dvc_yaml}: module deps {'rewritten' if new != text else 'already current'}")
        return 0
    stale = stale_stages(root, dvc_yaml)
    if stale:
        print(f"{dvc_yaml}: stale module deps in {', '.join(stale)}; run `python -m cxrsynth.deps --write`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
