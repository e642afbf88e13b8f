"""Imports in carsam_onnx run one way: down the layers below, never in a circle, and torch stays out of the
numpy side (passes/, qmath.py, artifact.py and everything they import).

Every import counts, also those inside functions (a lazy import is still a dependency). A module that fits no
layer fails the test: place it in LAYERS.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "carsam_onnx"

# Lowest first. A module may import modules of its own layer (without a cycle) or of a lower one.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "config", "qmath", "artifact", "modelio", "progress"),   # foundations
    ("data", "export", "samgraph"),                          # inputs, SAM -> ONNX, what SAM graph this is
    ("passes",),                                             # ONNX graph passes (numpy only)
    ("torchexec",),                                          # ONNX -> torch executor (engine)
    ("runtime",),                                            # sessions: ONNX Runtime, torch executor, registry
    ("calib",),                                              # calibration policy
    ("deploy",),                                             # predictor, TensorRT, report
    ("eval",),                                               # evaluation loop, metrics
    ("quantize", "api", "summary"),                          # the pipeline and the Python API
    ("cli", "command_guard", "__main__"),                    # command line, how a command ends
]
NO_TORCH = ("passes", "qmath", "artifact")


def layer_of(module: str) -> int | None:
    """Layer index of a dotted module name below the package ("calib.baseline" -> 5)."""
    top = module.split(".")[0]
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], set[str]]:
    """(module -> package modules it imports, modules importing torch), names relative to the package."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    torch_users: set[str] = set()
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if name else []
        base_pkg = here if is_pkg else here[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "torch":
                        torch_users.add(name)
                    if a.name.startswith("carsam_onnx"):
                        targets.append(a.name[len("carsam_onnx."):] if "." in a.name else "")
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    mod = node.module or ""
                    if mod.split(".")[0] == "torch":
                        torch_users.add(name)
                    if not mod.startswith("carsam_onnx"):
                        continue
                    parent = mod[len("carsam_onnx."):] if "." in mod else ""
                else:
                    anchor = base_pkg[: len(base_pkg) - (node.level - 1)]
                    parent = ".".join(anchor + ([node.module] if node.module else []))
                for a in node.names:     # `from pkg import submodule` depends on the submodule
                    sub = f"{parent}.{a.name}" if parent else a.name
                    targets.append(sub if sub in modules else parent)
            for t in targets:
                if t != name and t:
                    deps.add(t)
        graph[name] = deps
    return graph, torch_users


def _own_submodule(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodules (a registration pattern, e.g. torchexec/ops)."""
    return b.startswith(a + ".")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if _own_submodule(n, m):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def violations(graph: dict[str, set[str]], torch_users: set[str]) -> list[str]:
    problems = []
    for a in sorted(graph):
        if not a:
            continue
        la = layer_of(a)
        if la is None:
            problems.append(f"{a}: in no layer (add it to LAYERS)")
            continue
        for b in sorted(graph[a]):
            lb = layer_of(b)
            if lb is not None and lb > la:
                problems.append(f"{a} imports {b}: upward ({LAYERS[la][0]}... layer {la} -> layer {lb})")
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    for root in sorted(m for m in graph if m.split(".")[0] in NO_TORCH):
        seen, todo = {root}, [root]
        while todo:
            m = todo.pop()
            if m in torch_users:
                problems.append(f"{root} imports torch (through {m})")
                break
            for d in graph.get(m, ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
    return problems


def test_package_imports_run_down_the_layers():
    graph, torch_users = import_graph()
    assert len(graph) > 40 and "torchexec.module" in graph and "qmath" in graph   # the scan found the package
    assert "calib.baseline" in torch_users and "torchexec" in graph["calib.baseline"]
    assert violations(graph, torch_users) == []


def test_checker_fails_on_upward_imports_cycles_and_torch_in_passes():
    ok = {"errors": set(), "qmath": {"errors"}, "passes.plan": {"qmath"}, "calib.baseline": {"passes.plan"},
          "cli": {"calib.baseline"}}
    assert violations(ok, {"calib.baseline"}) == []

    upward = {**ok, "passes.plan": {"qmath", "calib.baseline"}}
    found = violations(upward, {"calib.baseline"})
    assert any("passes.plan imports calib.baseline: upward" in p for p in found), found

    circle = {**ok, "runtime.ort": {"runtime.torch_runtime"}, "runtime.torch_runtime": {"runtime.ort"}}
    found = violations(circle, set())
    assert any(p.startswith("import cycle: runtime.ort -> runtime.torch_runtime -> runtime.ort") for p in found), found

    torch_in_passes = {**ok, "passes.plan": {"qmath", "data.preprocess"}, "data.preprocess": set()}
    found = violations(torch_in_passes, {"data.preprocess"})
    assert found == ["passes.plan imports torch (through data.preprocess)"], found

    assert violations({"newthing": set()}, set()) == ["newthing: in no layer (add it to LAYERS)"]


def test_own_submodule_imports_are_no_cycle_but_others_are():
    assert find_cycle({"torchexec.ops": {"torchexec.ops.nn"}, "torchexec.ops.nn": {"torchexec.ops"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
