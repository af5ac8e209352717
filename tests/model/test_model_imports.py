"""coatnet's own import graph: imports at module top, and no cycle between its modules."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import coatnet

PKG = Path(coatnet.__file__).parent


def _own_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(coatnet module imported, whether at module level) for every import of the package's own modules."""
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "coatnet":
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "coatnet"]
        found += [(n, id(node) in top) for n in names]
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PKG.glob("*.py")):
        if path.name == "__init__.py":
            continue
        imports = _own_imports(ast.parse(path.read_text()))
        inner = [name for name, at_top in imports if not at_top]
        assert not inner, f"{path.name}: imports {inner} inside a function; import at module top"
        graph[f"coatnet.{path.stem}"] = {name for name, _ in imports if name != "coatnet"}
    return graph


def test_coatnet_modules_import_at_top_without_cycles():
    graph = _graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import cycle in coatnet: {e.args[1]}") from None
    # The state-dict helpers are a leaf the model builds on; adapt sits above model and registry.
    assert graph["coatnet.state_dict"] <= {"coatnet.config"}
    assert order.index("coatnet.state_dict") < order.index("coatnet.model") < order.index("coatnet.adapt")


def test_the_check_tells_a_function_body_import_from_a_top_level_one():
    src = "import torch\nfrom coatnet.model import CoAtNet\n\ndef f():\n    from coatnet.adapt import x\n"
    assert _own_imports(ast.parse(src)) == [("coatnet.model", True), ("coatnet.adapt", False)]
