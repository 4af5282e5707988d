"""docs/plugins.md documents every attribute and method a regularizer may define, with the right signature."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from regfw.extend.regularizer import InjectingRegularizer, Regularizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def contract_sections() -> dict[str, str]:
    """``{member: its section}`` for every ``#### `member` `` heading of "## The regularizer contract"."""
    text = DOC.read_text().split("\n## The regularizer contract\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^#### ", text, flags=re.M)[1:]
    return {re.fullmatch(r"`(\w+)`", part.split("\n", 1)[0].strip()).group(1): part for part in parts}


def members() -> dict[str, object]:
    """Every public attribute and method of the two base classes, and the instance attributes."""
    found: dict[str, object] = {}
    for cls in (Regularizer, InjectingRegularizer):
        for name, value in vars(cls).items():
            if not name.startswith("_"):
                found.setdefault(name, value)
    for name in vars(Regularizer()):
        found.setdefault(name, None)
    return found


def test_every_member_is_documented_and_every_documented_member_exists():
    documented, code = set(contract_sections()), set(members())
    assert code >= {"name", "Config", "config", "plan", "apply", "transform_batch", "transform_loss", "loss_term"}
    assert not code - documented, f"undocumented in docs/plugins.md: {sorted(code - documented)}"
    assert not documented - code, f"docs/plugins.md documents members that do not exist: {sorted(documented - code)}"


@pytest.mark.parametrize("name", sorted(members()))
def test_documented_signature_matches_the_code(name):
    section = contract_sections()[name]
    block = re.search(r"```python\n(.*?)\n```", section, flags=re.S)
    assert block, f"{name}: no signature block"
    first = block.group(1).splitlines()[0]
    value = members()[name]
    description = section.split("```", 2)[2].strip()
    assert len(description) > 40, f"{name}: describe what it is for and when it is used"
    if callable(value) and not isinstance(value, type):
        func = ast.parse(f"def {first.split(' -> ')[0]}: pass").body[0]
        assert func.name == name, first
        assert [a.arg for a in func.args.args] == list(inspect.signature(value).parameters), first
        assert " -> " in first, f"{name}: the return type is documented"
        assert re.search(r"\b([Cc]alled|[Bb]efore|[Aa]fter|every training step)\b", section), \
            f"{name}: say when it is called"
    else:
        assert first.startswith(f"{name}: "), first
