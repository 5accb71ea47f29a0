"""docs/architecture.md is the map of the code: it lists every module under src/llmneo, by layer, and no module
imports a module of a later layer. Also the loss contract's single definitions and the trainer's private state."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "llmneo"
MAP = ROOT / "docs" / "architecture.md"


def documented_layers() -> dict[str, int]:
    """module path (relative to src/llmneo) -> layer, from the '### Layer N' tables of the module map."""
    layers, layer = {}, None
    for line in MAP.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"### Layer (\d+)", line)
        if heading:
            layer = int(heading.group(1))
        elif line.startswith("## ") and layer is not None:
            layer = None
        row = re.match(r"\| `([\w/]+\.py)` \|", line)
        if row and layer is not None:
            assert row.group(1) not in layers, f"{row.group(1)} is listed twice"
            layers[row.group(1)] = layer
    return layers


def source_modules() -> set[str]:
    return {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}


def module_path(dotted: str) -> str | None:
    """src/llmneo-relative path of an llmneo module name, or None when it is not one."""
    parts = dotted.split(".")
    if parts[0] != "llmneo":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(PACKAGE).as_posix()
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(PACKAGE).as_posix()
    return None


def imported_modules(path: str) -> set[str]:
    """Every llmneo module that ``path`` imports (at top level or inside functions)."""
    package = ["llmneo", *Path(path).parent.parts]
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {resolved for name in names if (resolved := module_path(name))}
    return found - {path}


def test_the_map_lists_every_module_and_nothing_else():
    listed, present = set(documented_layers()), source_modules()
    assert not present - listed, f"modules missing from docs/architecture.md: {sorted(present - listed)}"
    assert not listed - present, f"docs/architecture.md lists modules that do not exist: {sorted(listed - present)}"


def test_no_module_imports_a_later_layer():
    layers = documented_layers()
    upward = [f"{module} (layer {layers[module]}) imports {imported} (layer {layers[imported]})"
              for module in sorted(layers) for imported in sorted(imported_modules(module))
              if layers[imported] > layers[module]]
    assert not upward, "\n".join(upward)


def test_the_shifted_answer_mask_and_ignore_index_are_defined_once():
    pattern = re.compile(r"\[:, 1:\] != |!= -100|IGNORE_INDEX =")
    hits = [f"{path.relative_to(PACKAGE)}: {line.strip()}" for path in PACKAGE.rglob("*.py")
            for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
    assert len(hits) == 2 and all(hit.startswith("losses/contract.py") for hit in hits), hits


def test_no_code_outside_the_trainers_sets_private_trainer_state():
    assignment = re.compile(r"\btrainer\._\w+(\[[^\]]*\])?\s*=[^=]|\btrainer\._(save_checkpoint|train_batch_size)\b")
    offenders = [f"{path.relative_to(PACKAGE)}: {line.strip()}" for path in PACKAGE.rglob("*.py")
                 if "training" not in path.relative_to(PACKAGE).parts
                 for line in path.read_text(encoding="utf-8").splitlines() if assignment.search(line)]
    assert not offenders, offenders


# Entry points run as programs, not imported: `python -m llmneo` is covered by the CLI tests through cli.py.
NOT_IMPORTED = {"__main__.py"}


def test_every_source_module_is_imported_by_a_test():
    tests = ROOT / "tests"
    imported = set()
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmneo"):
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
    covered = {found for name in imported if (found := module_path(name))}
    missing = sorted(module for module in source_modules() - covered - NOT_IMPORTED
                     if not module.endswith("__init__.py"))
    assert not missing, f"source modules no test imports: {missing}"
