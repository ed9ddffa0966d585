"""Every tensor the step, the loop and their parts create names its device.

On CPU every tensor lives on one device, so a tensor made without `device=` that later meets the
model's or the batch's tensors passes every CPU test and fails on the first GPU run (as the token
count of `train.log_record` once did). This test reads the sources instead: in the modules that run
with device tensors, every call of a torch factory (torch.tensor, zeros, ones, empty, full, arange,
rand*, linspace, eye, as_tensor) passes `device=`. Deliberate host tensors say so on their line with
`# host: <why>`; arguments of nn.Parameter / register_buffer are exempt (a module is built on the
host and moved whole by `.to(device)`). Host-only modules (tide_ds/data: collating runs before the
batch moves) are out of scope."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tide_ds"
# the modules whose tensors meet the model's or the batch's on the device
SCOPE = [
    "train.py",
    "teach.py",
    "metrics.py",
    "checkpoint.py",
    "tree.py",
    "pipeline",
    "objectives",
    "kernels",
    "engine",
    "models",
    "diffusion",
    "generate.py",
    "eval/loss.py",
]
FACTORIES = {
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "linspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "randperm",
}
HOST = "# host:"


def scoped_files() -> list[pathlib.Path]:
    files = []
    for entry in SCOPE:
        path = PACKAGE / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def undeviced_factories(source: str) -> list[tuple[int, str]]:
    """(line, text) of each torch factory call without `device=`, outside nn.Parameter /
    register_buffer arguments and lines marked `# host:`."""
    lines = source.splitlines()
    exempt: set[int] = set()  # ids of calls inside a module's own construction
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("Parameter", "register_buffer"):
                exempt.update(id(n) for arg in node.args for n in ast.walk(arg))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        f = node.func
        if not (f.attr in FACTORIES and isinstance(f.value, ast.Name) and f.value.id == "torch"):
            continue
        if id(node) in exempt or any(k.arg == "device" for k in node.keywords):
            continue
        span = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
        if any(HOST in line for line in span):
            continue
        found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


def test_every_factory_call_in_the_device_code_names_its_device():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for path in scoped_files()
        for line, text in undeviced_factories(path.read_text())
    ]
    assert not bad, "torch factory calls without device= (add device=..., or '# host: why'):\n" + "\n".join(bad)


def test_the_check_sees_what_it_must():
    src = (
        "import torch\n"
        "a = torch.tensor(1.0)\n"  # flagged
        "b = torch.zeros(3, device=x.device)\n"
        "c = torch.arange(4)  # host: an index list for the CPU sampler\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        self.w = torch.nn.Parameter(torch.ones(3))\n"
        "        self.register_buffer('b', torch.zeros(2))\n"
        "y = torch.stack([s, torch.tensor(float(n))])\n"  # flagged: the old log_record
    )
    assert [line for line, _ in undeviced_factories(src)] == [2, 9]


def test_the_scope_exists():
    missing = [entry for entry in SCOPE if not (PACKAGE / entry).exists()]
    assert not missing, missing
