"""The architecture, checked: layers import one way, modules form no import cycle, only the engine layer imports
vLLM, and only the learner, run and kernels layers import torch at module level.

    game     pure rules: roles, prompts, CoT format, judge protocol, rewards, seeds
    engine   the in-process vLLM engines, the judge on an engine, rollout, engine placement
    learner  torch only: batches, the policy forward, losses, LoRA, SFT, the learner's step
    run      checkpoints, metrics, model resolution, reports, the trainer loop
    eval     held-out prompt sets, the refusal matcher, diversity, the evaluator on engines, its reports
    commands one module per CLI command; cli.py dispatches to them; __main__.py (`python -m fast_srt`, what torchrun
             launches) runs cli.py
Leaves any layer may import: errors, config, faults, identity (and kernels from the learner).
"""

import ast
from pathlib import Path

import fast_srt

ROOT = Path(fast_srt.__file__).parent
LEAVES = {"errors", "config", "faults", "identity"}
ALLOWED = {  # layer -> layers it may import
    "game": set(),
    "engine": {"game"},
    "learner": {"game", "kernels"},
    "run": {"game", "engine", "learner", "kernels"},
    "eval": {"game", "engine", "run"},
    "commands": {"game", "engine", "learner", "run", "eval", "kernels"},
    "cli": {"commands", "engine"},
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["fast_srt", *parts])


def _imports(path: Path) -> set[str]:
    """Every fast_srt module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fast_srt"):
            for a in node.names:  # `from fast_srt.run import checkpoint` imports the module fast_srt.run.checkpoint
                sub = f"{node.module}.{a.name}"
                out.add(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fast_srt")}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py") if "data" not in p.parts}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "fast_srt"


def test_layers_import_one_way():
    bad = []
    for mod, deps in _graph().items():
        layer = _layer(mod)
        if layer in LEAVES or layer == "fast_srt":
            continue
        for dep in deps:
            d = _layer(dep)
            if d != layer and d not in LEAVES and d not in ALLOWED[layer]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, bad


def test_no_import_cycle():
    graph = _graph()
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles


def _third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def test_only_the_engine_layer_imports_vllm():
    users = sorted(_module_name(p) for p in ROOT.rglob("*.py") if "vllm" in _third_party(p))
    assert users and all(m.startswith("fast_srt.engine.") for m in users), users


def test_only_weight_sync_reaches_below_vllms_public_api():
    """model_executor / driver_worker / model_runner: vLLM internals, named in one module only."""
    words = ("model_executor", "driver_worker", "model_runner", "reload_weights")
    users = sorted(_module_name(p) for p in ROOT.rglob("*.py") if any(w in p.read_text() for w in words))
    assert users == ["fast_srt.engine.weight_sync"], users
