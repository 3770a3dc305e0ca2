"""The modules point one way: nothing imports a module that sits above it in the layering."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    (
        "fedmkt.errors",
        "fedmkt.files",
        "fedmkt.output_folders",
        "fedmkt.fastpaths",
        "fedmkt.interrupts",
        "fedmkt.progress",
        "fedmkt.config",
    ),
    (
        "fedmkt.config_reference",
        "fedmkt.losses",
        "fedmkt.selection",
        "fedmkt.alignment",
        "fedmkt.data",
        "fedmkt.model_sources",
        "fedmkt.models",
        "fedmkt.vocabulary_sizes",
        "fedmkt.payload",
        "fedmkt.privacy",
        "fedmkt.head",
        "fedmkt.adapters",
        "fedmkt.dp",
        "fedmkt.teacher_controls",
        "fedmkt.schedule",
    ),
    (
        "fedmkt.received",
        "fedmkt.evaluation",
        "fedmkt.public_answers",
        "fedmkt.teacher_targets",
        "fedmkt.party_module",
        "fedmkt.export",
        "fedmkt.model_scoring",
    ),
    ("fedmkt.callbacks",),
    ("fedmkt.federation",),
    ("fedmkt.federation.flower",),
    ("fedmkt.run",),
    ("fedmkt.cli",),
]
"""From the bottom up; a module may import its own layer and the ones below."""


def layer_of(module: str) -> int:
    if module == "fedmkt":  # the package itself (an empty __init__)
        return 0
    best, rank = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def modules():
    for path in sorted((ROOT / "fedmkt").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path
    for path in sorted((ROOT / "callbacks").rglob("*.py")):  # installed as fedmkt.callbacks
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield "fedmkt." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {name for name in found if name.startswith("fedmkt")}


def test_no_module_imports_one_above_it():
    wrong = []
    for module, path in modules():
        if module.endswith("__main__"):
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for target in imported(path, package):
            if target in ("fedmkt", "fedmkt.callbacks") and module.startswith("fedmkt.callbacks"):
                continue
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_the_flower_backend_builds_parties_below_the_cli_module():
    flower = [path for module, path in modules() if module.startswith("fedmkt.federation.flower")]
    assert flower and not any("fedmkt.run" in imported(path, "fedmkt.federation.flower") for path in flower)
