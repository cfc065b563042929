"""The package's layout is its architecture: each folder imports only from the folders below it
(model < data < store < train < eval < run < commands, with errors, logs and the Lightning adapter
under all), and no two modules import each other, directly or around a loop."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinytrain"
LAYERS = ["model", "data", "store", "train", "eval", "run", "commands"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The tinytrain modules a file imports, anywhere in it (a function's lazy import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinytrain"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tinytrain"))
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in LAYERS else 0


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) - {name} for name, path in known.items()}


def test_every_module_lives_in_a_layer_folder():
    loose = [m for m in modules() if layer(m) == 0 and m not in
             ("tinytrain", "tinytrain.__main__", "tinytrain.errors", "tinytrain.logs",
              "tinytrain.lightning_private")]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
              if layer(d) > layer(m) and m != "tinytrain.__main__"]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if dep.rsplit(".", 1)[0] == node:  # a package importing its own submodule (its __init__)
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep in edges and not state.get(dep):
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(edges):
        if not state.get(node):
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_test_folders_mirror_the_package():
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders <= set(LAYERS), f"test folders that are not package folders: {sorted(folders - set(LAYERS))}"
    for folder in folders:
        assert list((tests / folder).glob("test_*.py")), f"tests/{folder} holds no tests"
