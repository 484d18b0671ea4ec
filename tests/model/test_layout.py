"""The house's layout: the composing model, decoding and the tasks name no head, and the modules of
``pixelllm.model`` import each other without a circle (imports inside functions included)."""

import ast
from pathlib import Path

from pixelllm.model.heads import BUILT_IN

PACKAGE = Path(__file__).resolve().parents[2] / "pixelllm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_import_circle_in_the_model_package():
    files = {_module_name(p): p for p in (PACKAGE / "model").rglob("*.py")}
    graph = {name: {other for other in _imports(path) if other in files and other != name}
             for name, path in files.items()}
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}  # a package
    done, path = set(), []

    def visit(name):
        assert name not in path, "import circle: " + " -> ".join([*path[path.index(name):], name])
        if name in done:
            return
        path.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_model_decoding_and_tasks_name_no_head():
    names = {*BUILT_IN, "scene_captioner", "refer_reranker", "mask_refiner", "box_pixel", "word_head", "pointer"}
    names -= {"mask"}  # a word of its own ("mask_logits", a segmentation's mask)
    for file in ("model/pixelllm.py", "generation.py", "tasks.py"):
        text = (PACKAGE / file).read_text()
        named = sorted(name for name in names if f'"{name}"' in text or f".{name}" in text or f"heads.{name}" in text)
        assert not named, f"{file} names {named}"
