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


# The project's own modules, whose private names other modules of the project may import.
OWN_MODULES = {path.stem for path in SOURCES} | {"conftest"}

# Private imports allowed outside tunix_adapter.py, each by file and dotted name. tpu_fit.py is a benchmark, not the
# pipeline: it costs each while loop's body with XLA's HloCostAnalysis on HLO text, which no public JAX 0.10.2 API
# offers (``Lowered.cost_analysis`` itself calls jaxlib's ``hlo_module_cost_analysis``; jax.extend and jax.lib do
# not export it), so it reads jaxlib's extension modules directly.
ALLOWED_PRIVATE_IMPORTS = {"benchmarks/tpu_fit.py": {"jaxlib._hlo", "jaxlib._jax"}}


def is_private(name: str) -> bool:
    return any(re.fullmatch(r"_[a-z]\w*", part) for part in name.split("."))


def private_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of each import of another library's private module or name: ``import jax._src.core``,
    ``from jax._src import core``, ``from jaxlib import _jax``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if is_private(alias.name)
                      and alias.name.split(".")[0] not in OWN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] not in OWN_MODULES:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if is_private(node.module) or is_private(alias.name)]
    return found


def private_uses(path, allowed: set[str], name: str = "") -> list[str]:
    """Where a module reads a private attribute (``x._name``) that is not the project's own, other than through
    ``self`` or ``cls``; JAX's ``thread_resources``; and where it imports another library's private module or name,
    other than ALLOWED_PRIVATE_IMPORTS."""
    name = name or str(path.relative_to(REPO))
    tree = ast.parse(path.read_text())
    found = [f"{name}:{line} import {dotted}" for line, dotted in private_imports(tree)
             if dotted not in ALLOWED_PRIVATE_IMPORTS.get(name, set())]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        private = re.fullmatch(r"_[a-z]\w*", node.attr) and node.attr not in allowed and not (
            isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
        if private or node.attr == "thread_resources":
            found.append(f"{name}:{node.lineno} .{node.attr}")
    return found


def test_no_other_module_touches_tunix_private_api():
    allowed = own_private_names() | {"_exit"}  # os._exit, in a forked child
    found = [use for path in SOURCES if path.name != "tunix_adapter.py" for use in private_uses(path, allowed)]
    assert found == [], "Tunix's (or JAX's) private API outside tunix_adapter.py"
    assert private_uses(REPO / "tunix_adapter.py", allowed)  # the check sees what the adapter does
    for name, dotted in ALLOWED_PRIVATE_IMPORTS.items():  # each allowance is still needed: none outlives its use
        assert {d for _, d in private_imports(ast.parse((REPO / name).read_text()))} == dotted, name


def test_a_private_import_is_caught(tmp_path):
    """Private modules and names of other libraries, imported either way, are found; public ones and the project's
    own private names are not; tpu_fit.py's allowance covers only its own two names, in its own file."""
    planted = tmp_path / "planted.py"
    planted.write_text("import jax\nimport jax._src.core\nfrom jax._src import core\nfrom tunix.sft import _x\n"
                       "from jaxlib import _hlo, _jax\nfrom jax import numpy\nfrom model import _own\n"
                       "from __future__ import annotations\n")
    assert private_uses(planted, set(), "planted.py") == [
        "planted.py:2 import jax._src.core", "planted.py:3 import jax._src.core", "planted.py:4 import tunix.sft._x",
        "planted.py:5 import jaxlib._hlo", "planted.py:5 import jaxlib._jax"]
    assert private_uses(planted, set(), "benchmarks/tpu_fit.py") == [
        "benchmarks/tpu_fit.py:2 import jax._src.core", "benchmarks/tpu_fit.py:3 import jax._src.core",
        "benchmarks/tpu_fit.py:4 import tunix.sft._x"]
