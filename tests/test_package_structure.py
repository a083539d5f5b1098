"""The shape of atp_llava's imports: no import circle, and no import that runs upward through its
layers (DESIGN §2.3): the core (``core/``, family-blind, and the adapters in ``models/``), the
integration (the package's ``__init__``, ``patch``, ``generate``, ``io``), the tools (``tools/`` and the entry
points users run or import by name). ``core/`` never reaches ``models/`` either.

The graph is read from the source (every ``import`` and ``from ... import``, including those
inside functions, which an import at start-up would not see); a fresh interpreter then imports
every core and integration module with the tool modules blocked.
"""
import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "atp_llava")
# The command lines, the training entry point and loops, the data path and the test model: they
# build on the core and the integration; neither imports them. The entry points keep the public
# names (python -m atp_llava.train, atp_llava.trainer, ...); what they are built from is in tools/.
ENTRY_POINTS = {"lmms_eval_model", "report", "train", "trainer", "visualize"}
CORE_FOLDERS = ("core", "models")


def _is_tool(module: str) -> bool:
    return module in ENTRY_POINTS or module.split(".")[0] == "tools"


def _is_core(module: str) -> bool:
    return module.split(".")[0] in CORE_FOLDERS


def _modules() -> Dict[str, str]:
    """Dotted name inside the package ("patch", "models.llava", "" for __init__) -> path."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), PACKAGE)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        parts = name.split(".") if name else []
        package = parts if path.endswith("__init__.py") else parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    deps.add(".".join(base + node.module.split(".")))
                    # from .core import flash: the submodule too (names that are not modules drop out below)
                    deps.update(".".join(base + node.module.split(".") + [a.name]) for a in node.names)
                else:
                    deps.update(".".join(base + [a.name]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "atp_llava":
                deps.add(node.module[len("atp_llava."):] if "." in node.module else "")
            elif isinstance(node, ast.Import):
                deps.update(a.name[len("atp_llava."):] for a in node.names if a.name.startswith("atp_llava."))
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as a list of modules, [] if there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_graph_reader_finds_imports_inside_functions_and_circles():
    graph = _graph()
    assert "core.efficiency" in graph["patch"] and "tools.cli" in graph["report"]  # report's cli import is inside a function
    assert "patch" in graph["io"]  # io imports patch inside load_atp
    assert "core.flash" in graph["patch"]  # from .core import flash
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def _reached(graph: Dict[str, Set[str]], module: str) -> Set[str]:
    seen, todo = set(), [module]
    while todo:
        for d in graph[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


def _tools(graph: Dict[str, Set[str]]) -> Set[str]:
    return {m for m in graph if _is_tool(m)}


def test_the_layers_are_where_the_test_looks():
    graph = _graph()
    assert ENTRY_POINTS <= set(graph), f"entry points not found: {sorted(ENTRY_POINTS - set(graph))}"
    assert {"tools", "tools.cli", "tools.data", "tools.tiny"} <= set(graph)
    assert {"core", "core.config", "core.step", "models", "models.llava", "patch", "io"} <= set(graph)
    assert not _is_core("patch") and not _is_tool("patch") and _is_core("models.llava") and _is_tool("tools.cli")


def test_the_core_never_imports_a_tool():
    graph = _graph()
    tools = _tools(graph)
    for module in sorted(set(graph) - tools - {""}):
        seen = _reached(graph, module)
        assert not seen & tools, f"atp_llava.{module} reaches the tools {sorted(seen & tools)}"


def test_the_core_never_imports_the_integration_and_core_never_a_model_family():
    graph = _graph()
    for module in sorted(m for m in graph if _is_core(m)):
        above = {m for m in _reached(graph, module) if not _is_core(m)}
        assert not above, f"atp_llava.{module} reaches {sorted(above)}, above the core"
        if module.split(".")[0] == "core":
            families = {m for m in _reached(graph, module) if m.split(".")[0] == "models"}
            assert not families, f"atp_llava.{module} (family-blind) reaches {sorted(families)}"


def test_every_core_module_imports_with_the_tools_blocked():
    graph = _graph()
    tools = _tools(graph)
    core = sorted(m for m in graph if m and m not in tools)
    code = (
        "import importlib, importlib.abc, sys\n"
        f"tools = {sorted('atp_llava.' + t for t in tools)!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name in tools:\n"
        "            raise ImportError(f'{name} is a tool module, imported from the core')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {['atp_llava.' + m for m in core]!r}:\n"
        "    importlib.import_module(m)\n"
        "import atp_llava\n"
        "print(sorted(m for m in sys.modules if m in tools))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(PACKAGE), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
