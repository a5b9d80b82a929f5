"""The import direction of DESIGN.md as a checked contract: every `cirlab` module, read as source (imports inside
functions included), imports only from its own package or from packages to its right in

    cli, experiments, serving, training, evaluation, methods, {captioning, editing}, backbones,
    {layers, losses, data, index}, {atomic, jsonl, batches, allocator}, {types, errors}

(packages in one brace import none of each other), and no two modules import each other in a cycle (a module
importing its own package, as `methods.base` does to register the built-in methods, is not one)."""
from __future__ import annotations

import ast
from pathlib import Path

import cirlab

ROOT = Path(cirlab.__file__).parent
LAYERS = [{"cli"}, {"experiments"}, {"serving"}, {"training"}, {"evaluation"}, {"methods"}, {"captioning", "editing"},
          {"backbones"}, {"layers", "losses", "data", "index"},
          {"atomic", "jsonl", "batches", "allocator"}, {"types", "errors"}]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict:
    """Dotted module name -> its file, for every module under src/cirlab."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, module: str, known: dict) -> set:
    """The cirlab modules `path` imports, anywhere in the file; `from cirlab.x import y` counts as cirlab.x.y when
    that is a module, else cirlab.x."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cirlab")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("cirlab"):
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return found - {module}


def _package(module: str) -> str:
    """A module's first component under cirlab ('cirlab.methods.csmcir' -> 'methods'); the package itself: ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_imports_only_to_its_right():
    known = _modules()
    unplaced = sorted({_package(m) for m in known} - set(RANK) - {""})
    assert not unplaced, f"packages with no place in the import direction: {unplaced}"
    wrong = []
    for module, path in known.items():
        src = _package(module)
        for target in _imports(path, module, known):
            dst = _package(target)
            if not src or not dst or src == dst:
                continue
            if RANK[dst] <= RANK[src]:
                wrong.append(f"{module} imports {target} ({src} may import only to the right of it)")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    known = _modules()
    graph = {m: {t for t in _imports(p, m, known) if t in known and not m.startswith(t + ".")}
             for m, p in known.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The walker finds imports inside functions and relative ones (a check that could not fail proves nothing)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cirlab.cli.main import main\n\nfrom ..methods import base\n")
    known = {"cirlab.cli.main": None, "cirlab.methods.base": None}
    assert _imports(f, "cirlab.data.m", known) == {"cirlab.cli.main", "cirlab.methods.base"}
