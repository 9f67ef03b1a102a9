"""The package's shape: sub-packages that say where things go, imports that only run downhill (counting
imports inside functions and absolute ones), no stage importing another stage, no module over 400 lines,
one call to matplotlib.use, one home for the column scheme."""
import ast
from pathlib import Path

import pytest

from pipeline.stages import STAGES

PKG = Path(__file__).resolve().parents[1] / "pipeline"
MODULES = {".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__"): p
           for p in PKG.rglob("*.py")}
STAGE_MODULES = {f"stages.{m}" for m in STAGES.values()}
# floors, lowest first: a module imports only from its own floor's packages or lower ones
FLOORS = [
    {"errors", "registry", "metrics", "tasks"},  # the ground: imports only the ground
    {"store"},  # paths, atomic io, artifact groups, plots, the leaderboard
    {"competition"},  # the competition's tables, images, submission format
    {"training", "predict", "level2"},  # fold models, prediction, level 2 (training and predict see each other's floor)
    {"config"},  # the schema validates names against the registries of the floors below
    {"kaggle"},  # the bundle's runtime: reads fold models, level 2, rules, the config section
    {"stages"},  # one module per stage (+ the stage table)
    {"__init__", "__main__", ""},  # the public API and the CLI
]
FLOOR = {pkg: i for i, pkgs in enumerate(FLOORS) for pkg in pkgs}


def _resolve(module: str, names) -> set[str]:
    """`from pipeline.<module> import <names>`: the package modules this means (a name may be a sub-module)."""
    found = set()
    for name in names:
        sub = f"{module}.{name}" if module else name
        found.add(sub if sub in MODULES else module)
    return found


def _imports(path: Path, package: str = "") -> set[str]:
    """Package modules imported by a file, anywhere in it (module level or inside functions), as dotted
    names under ``pipeline`` ("store.io"); relative imports resolve against ``package``."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = [a.name for a in getattr(node, "names", ())]
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
            module = ".".join([*base, *([node.module] if node.module else [])]).strip(".")
            found |= _resolve(module, names)
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module + ".").startswith("pipeline."):
            found |= _resolve(node.module.removeprefix("pipeline").strip("."), names)
        elif isinstance(node, ast.Import):
            found |= {n.removeprefix("pipeline.") for n in names if n.startswith("pipeline.")}
    return {m for m in found if m}


def _package(module: str) -> str:
    return module.split(".")[0] if "." in module or module not in ("__init__", "__main__") else module


GRAPH = {m: _imports(p, m.rpartition(".")[0] if p.name != "__init__.py" else m) for m, p in MODULES.items()}


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
    # the walker sees module-level, absolute and function-level imports (guards against a vacuous pass)
    assert "training.trainer" in GRAPH["stages.train"] and "errors" in GRAPH["config.loading"]
    assert "training.losses" in GRAPH["config.schema"]  # imported inside a validator
    assert "store.leaderboard" in GRAPH["stages"]  # `from pipeline.store import leaderboard`, in a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_absolute_and_relative_imports_count_too(tmp_path):
    forms = {"from pipeline.stages import features": "stages.features", "from pipeline.stages.features import run":
             "stages.features", "import pipeline.stages.features": "stages.features",
             "from . import features": "stages.features", "from .features import run": "stages.features",
             "from ..store import io": "store.io", "def f():\n    from pipeline.stages import stack\n": "stages.stack"}
    for code, module in forms.items():
        (tmp_path / "m.py").write_text(code + "\n")
        assert module in _imports(tmp_path / "m.py", "stages"), code


def test_no_import_cycle():
    assert _cycle(GRAPH) is None


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_no_stage_imports_another_stage(stage):
    assert not (GRAPH[stage] & (STAGE_MODULES - {stage})), f"{stage} imports {GRAPH[stage] & STAGE_MODULES}"


def test_every_module_lives_on_a_floor():
    assert {_package(m) for m in MODULES} <= set(FLOOR), {_package(m) for m in MODULES} - set(FLOOR)


@pytest.mark.parametrize("package", sorted({_package(m) for m in MODULES} - {"__init__", "__main__"}))
def test_imports_run_downhill(package):
    """A package imports only from its own floor or below (no cycle is tested apart)."""
    up = {f"{m} -> {t}" for m, deps in GRAPH.items() if _package(m) == package
          for t in deps if FLOOR[_package(t)] > FLOOR[package]}
    assert not up, f"{package} imports upward: {sorted(up)}"


def test_store_imports_nothing_above_it():
    above = {f"{m} -> {t}" for m, deps in GRAPH.items() if _package(m) == "store"
             for t in deps if _package(t) not in FLOORS[0] | {"store"}}
    assert not above


def test_stages_hold_only_stages():
    # stages/ is one module per stage and the stage table; nothing else lives there
    assert {m for m in MODULES if _package(m) == "stages"} == STAGE_MODULES | {"stages"}


def test_modules_are_short_and_matplotlib_backend_is_set_once():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long
    uses = [m for m, p in MODULES.items() if "matplotlib.use(" in p.read_text()]
    assert uses == ["store.plots"]


def test_feature_column_scheme_has_one_home():
    # only store/paths.py joins or splits the `<set>__<head>__<output>__<stat>` scheme
    offenders = [m for m, p in MODULES.items() if m != "store.paths"
                 and any(s in p.read_text() for s in ('}__{', '.split("__")', "'__'", '"__"'))]
    assert not offenders


TASK_NAMES = {"binary", "multiclass", "regression", "ordinal", "multilabel"}


def _task_name_uses(tree) -> list[int]:
    """Lines that compare a value with a task name (``== "binary"``, ``in ("regression", "ordinal")``) or
    look one up in a literal table keyed by task names (``{"ordinal": ...}.get(task)``)."""
    def names(node):
        if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
            return True
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(names(e) for e in node.elts)

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(names(n) for n in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(k is not None and names(k) for k in node.keys):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and getattr(node.value, "id", "") == "Literal" and names(node.slice):
            lines.append(node.lineno)
    return lines


def test_task_names_are_compared_only_in_tasks():
    """Adding a task kind is one entry in pipeline/tasks.py: nowhere else asks 'is this task binary?'."""
    offenders = {m: found for m, p in MODULES.items() if m != "tasks"
                 and (found := _task_name_uses(ast.parse(p.read_text())))}
    assert not offenders, f"task names compared outside pipeline/tasks.py (module: lines): {offenders}"


def test_the_task_name_check_sees_each_form():
    for code in ('x == "binary"', 'task in ("regression", "ordinal")', '{"ordinal": "regression"}.get(t)',
                 '"multiclass" != kind', 'task: Literal["binary", "multiclass"] = "binary"'):
        assert _task_name_uses(ast.parse(code)), code
    assert not _task_name_uses(ast.parse('LOSSES["multiclass"].register("ce")'))


# checkpoint keys (the fold model's file layout) and raw checkpoint loads, with the one module that owns them
# (training.pretrained only asks the safe loader whether a pickled weights file would run code)
CHECKPOINT_OWNERS = {"training.checkpoint", "training.resume", "store.io", "training.pretrained"}


def test_checkpoint_files_are_read_only_by_their_owner():
    """Only training/checkpoint.py knows a fold checkpoint's keys (resume.py its own last.pt; io.py the safe
    loader); every other reader goes through ``Checkpoint``."""
    offenders = {m for m, p in MODULES.items() if m not in CHECKPOINT_OWNERS
                 and any(s in p.read_text() for s in ("load_checkpoint(", "torch.load(", '"model_cfg"', '"data_cfg"'))}
    assert not offenders, offenders


def test_the_bundles_wheel_is_rebuilt_when_any_sub_package_changes():
    """The code hash that rebuilds a bundle's wheel covers every module, not only one folder's."""
    from pipeline.stages.kaggle import code_files

    hashed = {str(p.relative_to(PKG.parent)) for p in code_files()}
    assert {str(p.relative_to(PKG.parent)) for p in MODULES.values()} <= hashed and "pyproject.toml" in hashed


def _dict_reads_of_the_config(tree) -> list[int]:
    """Lines that read the config (``cfg``, ``cfg.train``, ...) as a dict: ``cfg["train"]`` or ``cfg.get("name")``."""
    def rooted_at_cfg(node) -> bool:
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id == "cfg"

    def self_cfg(node) -> bool:
        while isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr == "cfg":
                return True
            node = node.value
        return False

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            target = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.func.value
        else:
            continue
        if rooted_at_cfg(target) or self_cfg(target):
            lines.append(node.lineno)
    return lines


# the store answers the `lb` command too, which may have no config but a plain dict (or None)
DICT_READERS = {"store.paths", "store.leaderboard", "store.io"}


def test_the_config_is_read_by_attribute():
    """Stages and library code read the validated ``Config`` (``cfg.train.lr``), not a dict
    (``cfg["train"]["lr"]``); only config/ handles the raw YAML dicts before validation."""
    offenders = {m: lines for m, p in MODULES.items() if not m.startswith("config") and m not in DICT_READERS
                 and (lines := _dict_reads_of_the_config(ast.parse(p.read_text())))}
    assert not offenders, f"the config read as a dict (module: lines): {offenders}"
    for code in ('cfg["train"]["lr"]', 'cfg.train["lr"]', 'cfg.get("name")', 'self.cfg.model["backbone"]'):
        assert _dict_reads_of_the_config(ast.parse(code)), code
    assert not _dict_reads_of_the_config(ast.parse('cfg.train.lr; spec["x"]; row.get("a")'))
