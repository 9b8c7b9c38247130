"""Tunix's private API is used only in tunix_adapter.py, and only with the Tunix it was written for."""

from __future__ import annotations

import ast
import re

from conftest import REPO
from tunix.sft import peft_trainer

import tunix_adapter


def test_the_installed_tunix_is_the_one_the_adapter_was_written_for():
    assert tunix_adapter.unpinned_tunix() is None, (
        f"{tunix_adapter.unpinned_tunix()}: check every PINNED function against it (model.py's fused attention "
        "copies Attention.block), then update TUNIX_VERSION and the hashes in tunix_adapter.py")


def test_another_version_or_a_changed_private_function_is_caught(monkeypatch):
    monkeypatch.setattr(tunix_adapter, "version", lambda package: "0.1.8")
    assert tunix_adapter.unpinned_tunix() == ("google-tunix 0.1.8 is installed, but tunix_adapter.py was written "
                                              "for 0.1.7")
    monkeypatch.undo()

    def _save_last_checkpoint(self):  # the same name, another body: a Tunix that changed it under the same version
        pass

    monkeypatch.setattr(peft_trainer.PeftTrainer, "_save_last_checkpoint", _save_last_checkpoint)
    assert tunix_adapter.changed_private_api() == ["PeftTrainer._save_last_checkpoint"]
    assert "PeftTrainer._save_last_checkpoint changed" in tunix_adapter.unpinned_tunix()


SOURCES = [*REPO.glob("*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("notebooks/*.py")]


def own_private_names() -> set[str]:
    """The private names the project's own modules define at their top level (read across modules by tests)."""
    names = set()
    for path in SOURCES:
        for node in ast.parse(path.read_text()).body:
            targets = [node] if isinstance(node, ast.FunctionDef | ast.ClassDef) else getattr(node, "targets", [])
            names |= {getattr(target, "name", getattr(target, "id", "")) for target in targets}
    return {name for name in names if name.startswith("_")}


def private_uses(path, allowed: set[str]) -> list[str]:
    """Where a module reads a private attribute (``x._name``) that is not the project's own, other than through
    ``self`` or ``cls``; and JAX's ``thread_resources``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        private = re.fullmatch(r"_[a-z]\w*", node.attr) and node.attr not in allowed and not (
            isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
        if private or node.attr == "thread_resources":
            found.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    return found


def test_no_other_module_touches_tunix_private_api():
    allowed = own_private_names() | {"_exit"}  # os._exit, in a forked child
    found = [use for path in SOURCES if path.name != "tunix_adapter.py" for use in private_uses(path, allowed)]
    assert found == [], "Tunix's (or JAX's) private API outside tunix_adapter.py"
    assert private_uses(REPO / "tunix_adapter.py", allowed)  # the check sees what the adapter does
