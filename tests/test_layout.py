"""The package's layering: data flows one way, config -> data / model / mesh -> objective + step ->
loop -> checkpoint -> loader -> sample / serve / export, and no module imports one above it. Read from the source with
``ast`` (imports inside functions count too), so the rule holds without running anything."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxgpt"

# Layers from the bottom; a module may import its own group and any lower layer, never a sibling
# group of its layer or anything above. The mesh sits under the model: the Pallas kernels run per
# shard by its logical-axis rules.
LAYERS: list[dict[str, set[str]]] = [
    {"base": {"backend", "compile_cache", "host_memory", "inputs", "paths"}},
    {"config": {"config_keys", "config"}},
    {"mesh": {"sharding"}},
    {"data": {"data", "tokenizer"},
     "model": {"model", "kernels", "flash", "decoding", "loss", "weights", "lora", "peft_io"}},
    {"objective + step": {"objectives", "step", "setup", "reference"}},
    {"loop": {"loop", "metrics"}},
    {"checkpoint": {"checkpoint", "runlock", "preemption"}},
    {"loader": {"loader"}},
    {"apps": {"sample", "chat", "export", "demo", "kv_slots", "engine", "serve", "train", "__init__"}},
]

# Exceptions, each an (importer, imported) edge with its reason; none today. The test fails when a
# listed edge is gone, so this list only shrinks.
ALLOWED: set[tuple[str, str]] = set()


def _position() -> dict[str, tuple[int, str]]:
    return {m: (i, group) for i, layer in enumerate(LAYERS) for group, mods in layer.items() for m in mods}


def _module_of(path: Path) -> str:
    """``jaxgpt/x.py`` -> ``x``; a subpackage's files (``jaxgpt/data/read.py``) count as the package."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else path.stem


def package_imports() -> dict[str, set[str]]:
    """{module: the jaxgpt modules it imports anywhere in its source}."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_of(p) for p in files}
    out: dict[str, set[str]] = {}
    for path in files:
        found = out.setdefault(_module_of(path), set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxgpt.")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "jaxgpt":
                    found |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith("jaxgpt."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom):  # relative: only within a subpackage
                assert path.parent != PACKAGE, f"{path}: relative import; jaxgpt imports by absolute name"
    return {m: deps - {m} for m, deps in out.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(set(package_imports()) - set(_position()))
    assert not unplaced, f"jaxgpt modules missing from tests/test_layout.py LAYERS: {unplaced}"


def test_no_module_imports_one_above_it():
    pos, bad = _position(), []
    for module, imported in sorted(package_imports().items()):
        for dep in sorted(imported):
            (mine, group), (theirs, their_group) = pos[module], pos[dep]
            if (theirs > mine or (theirs == mine and group != their_group)) and (module, dep) not in ALLOWED:
                bad.append(f"{module} ({group}) imports {dep} ({their_group})")
    assert not bad, "\n".join(bad)


def test_allowed_exceptions_still_exist():
    """An exception that the code no longer needs comes off the list."""
    imports = package_imports()
    gone = sorted(edge for edge in ALLOWED if edge[1] not in imports.get(edge[0], set()))
    assert not gone, f"remove from ALLOWED: {gone}"


def test_no_import_cycles():
    graph = {m: {d for d in deps if (m, d) not in ALLOWED} for m, deps in package_imports().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules can fail: a model module that imports the training loop is caught."""
    import pytest

    real = package_imports()
    monkeypatch.setitem(globals(), "package_imports", lambda: {**real, "model": real["model"] | {"loop"}})
    with pytest.raises(AssertionError, match=r"model \(model\) imports loop"):
        test_no_module_imports_one_above_it()
