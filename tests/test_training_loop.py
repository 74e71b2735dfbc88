"""One training loop: only matching/training/loop.py steps an optimiser; every trainer goes through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parent.parent / "matching" / "training"
LOOP = TRAINING / "loop.py"
TRAINERS = ("scorer.py", "tower.py", "finetune.py", "distill.py")
# calls that make an optimiser step of their own
STEP_CALLS = {"step", "backward", "zero_grad", "clip_grad_norm_", "clip_grad_value_"}


def _own_steps(path: Path) -> list[str]:
    """Where ``path`` steps an optimiser itself: a step/backward/clip call, or anything from ``torch.optim``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STEP_CALLS:
            found.append(f"{path.name}:{node.lineno} .{node.func.attr}()")
        elif isinstance(node, ast.Attribute) and node.attr == "optim":
            found.append(f"{path.name}:{node.lineno} torch.optim")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.optim"):
            found.append(f"{path.name}:{node.lineno} from {node.module} import")
        elif isinstance(node, ast.Import) and any(a.name.startswith("torch.optim") for a in node.names):
            found.append(f"{path.name}:{node.lineno} import torch.optim")
    return found


def test_the_check_sees_an_optimiser_step() -> None:
    found = " ".join(_own_steps(LOOP))
    for call in (".step()", ".backward()", ".zero_grad()", ".clip_grad_norm_()", "torch.optim"):
        assert call in found


@pytest.mark.parametrize(
    "path", sorted(p for p in TRAINING.rglob("*.py") if p != LOOP), ids=lambda p: str(p.relative_to(TRAINING))
)
def test_no_trainer_steps_an_optimiser_of_its_own(path: Path) -> None:
    assert _own_steps(path) == [], "step through matching.training.loop.Optimisation"


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_uses_the_one_step(name: str) -> None:
    tree = ast.parse((TRAINING / name).read_text(encoding="utf-8"))
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "Optimisation" in names
    assert "update" in calls
