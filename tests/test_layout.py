"""The package's layout: one folder per area, imports running one way, each area's
`__init__` its public face."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "functional_gpt"
HELPERS = {"errors", "files", "device", "checks"}
# Which areas each area may import from (besides itself); the top-level commands may import any.
ALLOWED = {
    "errors": set(),
    "files": {"errors", "checks"},
    "device": {"errors", "checks"},
    "checks": {"errors"},
    "model": HELPERS,
    "generation": HELPERS | {"model"},
    "interp": HELPERS | {"model"},
    "training": HELPERS | {"model", "generation"},
    "reference": HELPERS | {"model", "generation", "interp", "training"},
}
FACES = ("model", "generation", "training", "interp", "reference")


def module_imports() -> dict[str, set[str]]:
    """{dotted module under functional_gpt: the modules it imports (at any depth of the file)}."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts)
        package = list(parts[:-1])
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name.removeprefix("functional_gpt.") for a in node.names
                            if a.name.startswith("functional_gpt.")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("functional_gpt"):
                    module = node.module.removeprefix("functional_gpt").lstrip(".")
                else:
                    continue
                for alias in node.names:  # `from . import distributed` imports a module
                    sub = f"{module}.{alias.name}" if module else alias.name
                    targets.add(sub if (PACKAGE / (sub.replace(".", "/") + ".py")).exists() else module)
        graph[name] = {t for t in targets if t}
    return graph


GRAPH = module_imports()


def area(module: str) -> str:
    return module.split(".")[0]


def test_every_area_imports_only_the_areas_below_it():
    wrong = []
    for module, targets in GRAPH.items():
        if area(module) not in ALLOWED:  # cli, bench, info, __init__, __main__
            continue
        for target in targets:
            if area(target) != area(module) and area(target) not in ALLOWED[area(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_module_imports_itself_through_a_cycle():
    graph = {m: {t for t in ts if t in GRAPH} for m, ts in GRAPH.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        if state.get(m) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        state[m] = "open"
        for t in sorted(graph[m]):
            visit(t, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_the_checker_sees_a_wrong_import():
    """The rule above is not vacuous: the graph holds the imports it should."""
    assert "model.transformer" in GRAPH["interp.hooks"]
    assert "training.distributed" in GRAPH["training.loop"]  # `from . import distributed`
    assert "model.layers" in GRAPH["model.transformer"]


@pytest.mark.parametrize("face", FACES)
def test_each_face_lists_names_that_exist(face):
    module = importlib.import_module(f"functional_gpt.{face}")
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing and len(set(module.__all__)) == len(module.__all__)


def test_the_top_level_re_exports_the_model():
    import functional_gpt
    import functional_gpt.model as model

    assert set(functional_gpt.__all__) - {"UserError"} <= set(model.__all__)
    assert all(getattr(functional_gpt, n) is getattr(model, n) for n in functional_gpt.__all__ if n != "UserError")


def test_importing_the_model_or_training_loads_no_web_framework():
    code = ("import sys, functional_gpt, functional_gpt.training, functional_gpt.interp, functional_gpt.reference; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
