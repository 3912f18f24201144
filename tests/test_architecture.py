"""The shape of library/ that keeps it readable: no import cycles (function-level imports included), family
names compared only inside the families, small modules and functions, and a config/recipe layer that imports
no torch (so --help and config errors never wait for it)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "library"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def runtime_imports(tree: ast.AST) -> set[str]:
    """Every library module imported anywhere in the tree, except under `if TYPE_CHECKING:`."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("library"):
                found.update({child.module} | {f"{child.module}.{a.name}" for a in child.names})
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("library"))
            visit(child)

    visit(tree)
    return found


def test_no_import_cycles():
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {name: {m for m in runtime_imports(ast.parse(p.read_text(encoding="utf-8"))) if m in modules and m != name}
             for name, p in modules.items()}
    state: dict[str, int] = {}

    def cycle_from(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := cycle_from(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            assert (found := cycle_from(name, [name])) is None, " → ".join(found)


def test_family_names_are_compared_only_inside_the_families():
    pattern = re.compile(r"""(family(\.name)?\s*[!=]=|[!=]=\s*["']sd(1|2|xl)["'])""")
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in LIBRARY.rglob("*.py") if "families" not in p.parts
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_modules_and_functions_stay_small():
    too_big = []
    for path in LIBRARY.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 400:
            too_big.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert too_big == []


def test_config_and_recipes_load_without_torch():
    code = ("import sys, library.config.loading, library.recipes.run, library.recipes.lora, "
            "library.recipes.textual_inversion, library.recipes.dreambooth, library.recipes.hypernetwork, "
            "library.recipes.embedding_finetune; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
