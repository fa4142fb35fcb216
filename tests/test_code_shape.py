"""The shape the code keeps (issue 23): short functions, short modules, no import cycles between
the parts of `finetune`. A long function or module is allowed only where its docstring says why in
a line starting "Long because"; pure `ast`, nothing is imported."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "finetune"
MAX_FUNCTION_LINES = 40
MAX_MODULE_LINES = 300


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "conf" not in p.relative_to(SRC).parts)


def says_why(node: ast.AST) -> bool:
    doc = ast.get_docstring(node) or ""
    return any(line.strip().startswith("Long because") for line in doc.splitlines())


def part(path: Path) -> str:
    """The part of finetune a file belongs to: its subpackage, or the module itself at the top."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and not says_why(node)
    ]


def test_no_function_over_40_lines():
    found = [line for path in modules() for line in long_functions(path)]
    assert not found, "split these, or say why in a docstring line 'Long because ...':\n" + "\n".join(found)


def test_no_module_over_300_lines():
    found = []
    for path in modules():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and not says_why(ast.parse(text)):
            found.append(f"{path.relative_to(SRC)} ({lines} lines)")
    assert not found, "split these, or say why in a docstring line 'Long because ...':\n" + "\n".join(found)


def imported_parts(path: Path) -> set[str]:
    """The parts of finetune a file imports, at the top or inside functions."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if "." in node.module else [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        parts.update(name.split(".")[1] for name in names if name.startswith("finetune."))
    return parts


def test_no_import_cycles_between_parts():
    graph: dict[str, set[str]] = {}
    for path in modules():
        if path.relative_to(SRC) != Path("__init__.py"):
            graph.setdefault(part(path), set()).update(imported_parts(path) - {part(path)})
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == trail[0]:
                cycles.append(" -> ".join([*trail, nxt]))
            elif nxt not in trail and nxt > trail[0]:
                visit(nxt, [*trail, nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "import cycles between parts of finetune:\n" + "\n".join(cycles)
