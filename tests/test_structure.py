"""The shape of the package: no import circle, no module over 300 lines, and the modes (text,
latent, the autoencoder task) asked about only inside the modules that own them."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_cli"
MAX_LINES = 300
# The modules that own a mode, where asking about it is their job; and models/, where a network
# with cross-attention builds and runs it when it has a text encoder (counted apart below).
MODE_OWNERS = {"spaces.py", "conditions.py", "tasks.py", "prompts.py", "autoencoder.py",
               "models/text_encoder.py", "models/pretrained.py", "data/captions.py"}
NETWORKS = "models/"
MODE = re.compile(r"text|caption|prompt|latent|autoencod|encoded|null_condition|dim\(\) == 2", re.I)
MAX_MODE_TESTS = 10


def modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules that `name` imports, anywhere in it (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    return {module for module in found if module in known and module != name}


def test_no_import_circle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    # A package's __init__ importing its own submodules, and they the package, is how packages
    # are made: only circles between different modules count.
    graph = {name: {m for m in targets if not name.startswith(m + ".")} for name, targets in graph.items()}
    state, circles = {}, []

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_no_module_is_over_300_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def mode_tests(path: Path) -> list[str]:
    """The if / ternary / while / comprehension-filter tests of a file that ask about a mode."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        tests = node.ifs if isinstance(node, ast.comprehension) else \
            [node.test] if isinstance(node, (ast.If, ast.IfExp, ast.While)) else []
        found += [f"{path.relative_to(PACKAGE)}:{test.lineno}: {ast.unparse(test)}" for test in tests
                  if MODE.search(ast.unparse(test))]
    return found


def test_modes_are_asked_about_only_where_they_live():
    """Counted by the regular expression MODE over the source of every if, ternary, while and
    comprehension filter test (the seams' own modules and the networks left out); de2f18b had 82."""
    outside = [line for path in sorted(PACKAGE.rglob("*.py"))
               if str(path.relative_to(PACKAGE)) not in MODE_OWNERS
               and not str(path.relative_to(PACKAGE)).startswith(NETWORKS) for line in mode_tests(path)]
    assert len(outside) <= MAX_MODE_TESTS, "\n".join(outside)
