"""Imports point one way, down the pipeline: no module imports from a layer above its own.

The layers, lowest first. A package may import from its own layer's package and from any lower layer, never
from a higher one nor from a sibling of its layer (the utilities of layer 0 excepted), and ``eval`` keeps apart
from ``inference``: the fast path is applied to a model from outside, by the command.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llamalab"

LAYERS = [
    {"errors", "fs", "hardware"},            # plain utilities: no llamalab imports above them
    {"model", "tokenizer"},                  # the network and the text <-> ids mapping
    {"config", "checkpoint", "data"},        # the native format, training configs, prepared data
    {"parallel", "inference"},               # how a model is laid out for training / run for inference
    {"convert", "generate"},                 # other formats; decoding
    {"train", "eval"},                       # the pipeline's stages
    {"scaling", "finetune"},                 # sweeps of training runs and their fits; fine-tuning, a training task
    {"api", "serve"},                        # llamalab.load; the OpenAI-compatible server
    {"commands", "cli", "__main__", "__init__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
APART = {("eval", "inference")}  # lower, but the evaluator takes the fast path from outside


def top_level(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, src: Path) -> list[tuple[str, int]]:
    """(imported llamalab module, line) for every import in ``path``, function-level ones included."""
    module = ".".join(path.relative_to(src.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            if node.module:
                found.append((".".join(base + [node.module]), node.lineno))
            else:
                found += [(".".join(base + [alias.name]), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llamalab"):
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("llamalab.")]
    return found


def wrong_way_imports(src: Path = SRC) -> list[str]:
    wrong = []
    for path in sorted(src.rglob("*.py")):
        here = top_level(".".join(path.relative_to(src.parent).with_suffix("").parts))
        for target, line in imports(path, src):
            there = top_level(target)
            if there == here or there not in RANK:
                continue
            sideways = RANK[there] == RANK[here] and RANK[here] > 0  # the utilities may use one another
            if (RANK[there] > RANK[here] or sideways or (here, there) in APART) and RANK[here] < RANK["commands"]:
                wrong.append(f"{path.relative_to(src.parent)}:{line}: {here} (layer {RANK[here]}) imports "
                             f"{target} (layer {RANK[there]})")
    return wrong


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert packages - set(RANK) == set()


def test_no_import_runs_up_or_sideways():
    assert wrong_way_imports() == []
