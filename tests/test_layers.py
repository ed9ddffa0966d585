"""Imports run downhill and never in a circle.

Walks every import statement of every module of `tide_ds` (including those inside functions) and
checks the graph against the layer order written in README.md's "## Architecture" section."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tide_ds"
LAYERS_PREFIX = "Layers, bottom to top (a module imports only from layers below its own):"


def layer_order(readme: str) -> list[str]:
    """The parts of tide_ds, bottom first, from the one `Layers, bottom to top ...` line of the
    README's architecture section."""
    section = ("\n" + readme).split("\n## Architecture\n", 1)
    if len(section) < 2:
        raise ValueError("README.md has no '## Architecture' section")
    body = section[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith(LAYERS_PREFIX)]
    if len(lines) != 1:
        raise ValueError(f"README.md's architecture section needs exactly one line starting {LAYERS_PREFIX!r}")
    names = [part.strip().strip("`") for part in lines[0][len(LAYERS_PREFIX) :].rstrip(" .").split("→")]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"the layer line names each part once, separated by →: {names}")
    return names


def package_modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def extension_modules() -> set[str]:
    """Compiled extensions that setup.py declares (no .py file; they import nothing of ours)."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "").endswith("Extension")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def imports_of(module: str, path: pathlib.Path, modules: dict, extensions: set) -> set[str]:
    """The package's modules that `module` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found, dynamic = set(), False
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` steps above this module's own
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                if name in modules:
                    found.add(name)
                elif name not in extensions and base in modules:
                    found.add(base)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            dynamic = True
    if dynamic:  # a registry of module names imported by name (the CLI's subcommands) counts as imports
        found.update(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in modules)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    extensions = extension_modules()
    return {m: imports_of(m, p, modules, extensions) for m, p in modules.items()}


def part_of(module: str) -> str | None:
    """The top-level part of tide_ds a module belongs to (`engine`, `config`, ...); None for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def chain(graph: dict[str, set[str]], component: list[str]) -> str:
    """One circle through a component, as `a -> b -> ... -> a` (shortest path back, by BFS)."""
    start, members = component[0], set(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [start]
                    while node is not None:
                        path.append(node)
                        node = parents[node]
                    return " -> ".join(reversed(path))
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no circle through {component}")


def test_no_import_cycle():
    graph = import_graph()
    found = [f"{chain(graph, c)} (component: {', '.join(c)})" for c in cycles(graph)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_imports_run_downhill_in_the_readme_layer_order():
    order = layer_order((ROOT / "README.md").read_text(encoding="utf-8"))
    graph = import_graph()
    parts = {part_of(m) for m in graph} - {None}
    assert not parts - set(order), f"README's layer line does not list: {sorted(parts - set(order))}"
    assert not set(order) - parts, f"README's layer line lists parts that do not exist: {sorted(set(order) - parts)}"
    upward = []
    for module, targets in sorted(graph.items()):
        here = part_of(module)
        for target in sorted(targets):
            there = part_of(target)
            if here is not None and there is not None and there != here and order.index(there) > order.index(here):
                upward.append(f"{module} imports {target} ({here} is below {there})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_layer_line_is_required():
    with pytest.raises(ValueError, match="exactly one line"):
        layer_order("# x\n\n## Architecture\n\nsome text\n\n## Next\n" + LAYERS_PREFIX + " `a` → `b`\n")
    with pytest.raises(ValueError, match="no '## Architecture'"):
        layer_order("# x\n" + LAYERS_PREFIX + " `a`\n")
    assert layer_order(f"## Architecture\n{LAYERS_PREFIX} `a` → `b`\n") == ["a", "b"]


def test_circles_are_found_and_reported_as_chains():
    graph = {
        "tide_ds.a": {"tide_ds.b"},
        "tide_ds.b": {"tide_ds.c"},
        "tide_ds.c": {"tide_ds.a"},
        "tide_ds.d": {"tide_ds.a"},
    }
    assert cycles(graph) == [["tide_ds.a", "tide_ds.b", "tide_ds.c"]]
    assert chain(graph, ["tide_ds.a", "tide_ds.b", "tide_ds.c"]) == "tide_ds.a -> tide_ds.b -> tide_ds.c -> tide_ds.a"
    assert "tide_ds.kernels._cuda" in extension_modules()


def test_imports_are_resolved_to_modules(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(
        "import os\n\ndef f():\n    from tide_ds.engine import dist\n"
        "    from tide_ds.kernels import _cuda, fused_kl\n    from . import step\n"
        "    import tide_ds.diffusion.noise\n"
        "    importlib.import_module({'x': 'tide_ds.train'}['x'])\n"
    )
    found = imports_of("tide_ds.pipeline.fake", path, package_modules(), {"tide_ds.kernels._cuda"})
    # a submodule by its own name, a plain name by its package, the compiled extension not at all,
    # a module named in a file that imports by name
    assert found == {
        "tide_ds.engine.dist",
        "tide_ds.kernels",
        "tide_ds.pipeline.step",
        "tide_ds.diffusion.noise",
        "tide_ds.train",
    }
