"""Imports run downhill: config -> diffusion -> objectives -> kernels -> pipeline -> engine -> train."""
import ast
import pathlib

import tide_ds

LAYERS = ["config", "diffusion", "objectives", "kernels", "pipeline", "engine", "train"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == "tide_ds" and parts[1] in LAYERS else None


def test_no_upward_import_among_the_layers():
    root = pathlib.Path(tide_ds.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        module = "tide_ds." + ".".join(path.relative_to(root).with_suffix("").parts)
        here = _layer(module)
        if here is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                there = _layer(name)
                if there is not None and there > here:
                    upward.append(f"{module} imports {name}")
    assert not upward, upward
