"""The package's import graph: no module imports another's private name, and the module-level
imports form no cycle (modules load one way; an import inside a function is how a lower layer
reaches a higher one at run time, e.g. a weight asking the backend registry to unpack its codes)."""
import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "w4a16"


def _modules() -> dict:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    package = base if MODULES[module].name == "__init__.py" else base[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool):
    """(target module, imported name or None) of every ``from ... import`` / ``import`` in the package."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = _target(module, node)
            for alias in node.names:
                yield target, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def test_no_private_name_crosses_a_file():
    bad = []
    for module in MODULES:
        for target, name in _imports(module, top_level_only=False):
            if target.startswith("w4a16") and name and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{module} imports {target}.{name}")
    assert not bad, bad


def test_module_level_imports_form_no_cycle():
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        for target, name in _imports(module, top_level_only=True):
            full = f"{target}.{name}" if name else target
            for candidate in (full, target):
                if candidate in MODULES and candidate != module:
                    graph[module].add(candidate)
                    break
    # a package's __init__ importing its own modules is how packages work: not a cycle of design
    for module in graph:
        graph[module] = {t for t in graph[module] if not (module.startswith(t + ".") and MODULES[t].name == "__init__.py")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles
