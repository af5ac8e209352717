"""Imports at module top: an import inside a function is allowed only with a comment saying why it is lazy.

The one-way arrows between packages are `lint-imports`' (contracts in pyproject.toml, run by `make test`); this
checks what it cannot: that a function-body import was a choice (a `# lazy...` comment on its line or on the
comment line just above its group), not a way around an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWN = ("coatnet", "pipeline", "flows")
# In the packages every lazy import says why; in tests and benchmarks only imports of the packages must.
STRICT = OWN
LENIENT = ("tests", "benchmarks")


def _is_own(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] in OWN
    return any(a.name.split(".")[0] in OWN for a in node.names)


def function_body_imports(source: str) -> list[ast.Import | ast.ImportFrom]:
    found = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    walk(ast.parse(source), False)
    return found


def says_why(lines: list[str], node: ast.Import | ast.ImportFrom) -> bool:
    """A `# lazy` comment on the import's lines, or above it with only imports in between."""
    if any("# lazy" in lines[i] for i in range(node.lineno - 1, node.end_lineno)):
        return True
    i = node.lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            return "lazy" in text
        if not (text.startswith(("import ", "from ")) or text.endswith((",", "(")) or text == ")" or "# lazy" in text):
            return False
        if "# lazy" in text:
            return True
        i -= 1
    return False


def unexplained(source: str, *, own_only: bool) -> list[int]:
    lines = source.splitlines()
    return [n.lineno for n in function_body_imports(source)
            if (_is_own(n) or not own_only) and not says_why(lines, n)]


def test_every_lazy_import_says_why():
    bad = []
    for top, own_only in [*((d, False) for d in STRICT), *((d, True) for d in LENIENT)]:
        for path in sorted((REPO / top).rglob("*.py")):
            bad += [f"{path.relative_to(REPO)}:{line}" for line in unexplained(path.read_text(), own_only=own_only)]
    assert not bad, "imports inside functions without a `# lazy: why` comment (move them to module top):\n" + \
        "\n".join(bad)


def test_the_check_tells_an_explained_lazy_import_from_a_hidden_one():
    src = (
        "import os\n"
        "from pipeline import storage\n\n"
        "def a():\n    from pipeline.data import x\n\n"
        "def b():\n    # lazy: Ray is slow to import\n    import ray\n    from ray.train import y\n\n"
        "def c():\n    import torch  # lazy: for the reason here\n\n"
        "def d():\n    x = 1\n    import json\n"
    )
    assert unexplained(src, own_only=False) == [5, 17]
    assert unexplained(src, own_only=True) == [5]
