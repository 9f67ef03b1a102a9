"""The package's shape: no import cycle (counting imports inside functions too), no stage importing
another stage, no module over 400 lines, one call to matplotlib.use, one home for the column scheme."""
import ast
from pathlib import Path

import pytest

from pipeline.stages import STAGES

PKG = Path(__file__).resolve().parents[1] / "pipeline"
STAGE_MODULES = set(STAGES.values())


def _imports(path: Path) -> set[str]:
    """Package modules imported by a file, anywhere in it (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found |= {a.name for a in node.names}
            elif node.module and node.module.startswith("pipeline."):
                found.add(node.module.split(".")[1])
            elif node.module == "pipeline":  # from pipeline import features
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            pass  # the stage table (pipeline.stages) imports stages by name; it is not a stage
    return found


GRAPH = {p.stem: _imports(p) for p in PKG.glob("*.py")}


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_is_read_from_the_code():
    # the walker sees module-level, relative and function-level imports (guards against a vacuous pass)
    assert "trainer" in GRAPH["train"] and "errors" in GRAPH["config"]
    assert "losses" in GRAPH["schema"]  # imported inside a validator
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_absolute_imports_count_too(tmp_path):
    forms = {"from pipeline import features": "features", "from pipeline.features import run": "features",
             "import pipeline.features": "features", "from . import features": "features",
             "from .features import run": "features", "def f():\n    from pipeline import stack\n": "stack"}
    for code, module in forms.items():
        (tmp_path / "m.py").write_text(code + "\n")
        assert module in _imports(tmp_path / "m.py"), code


def test_no_import_cycle():
    assert _cycle(GRAPH) is None


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_no_stage_imports_another_stage(stage):
    assert not (GRAPH[stage] & (STAGE_MODULES - {stage})), f"{stage} imports {GRAPH[stage] & STAGE_MODULES}"


def test_modules_are_short_and_matplotlib_backend_is_set_once():
    long = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long
    uses = [p.name for p in PKG.glob("*.py") if "matplotlib.use(" in p.read_text()]
    assert uses == ["plots.py"]


def test_feature_column_scheme_has_one_home():
    # only paths.py joins or splits the `<set>__<head>__<output>__<stat>` scheme
    offenders = [p.name for p in PKG.glob("*.py") if p.name != "paths.py"
                 and any(s in p.read_text() for s in ('}__{', '.split("__")', "'__'", '"__"'))]
    assert not offenders
