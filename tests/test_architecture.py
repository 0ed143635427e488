"""The layers of the `components` package (see its __init__ docstring), checked on the
source: each layer imports only the layers below it, no step imports another step, and
nothing imports Airflow or kfp. `make lint` runs this file too."""

from __future__ import annotations

import pytest

from components.contract import STEP_ORDER
from tests.import_graph import external_imports, imports, modules

BASE = {"components", "components.contract", "components.config", "components.errors"}
ENTRY = {
    "components.cli",
    "components.workdir",
    "components.cluster",
    "components.refresh",
    "components.step_process",
    "components.__main__",
}
STEP_MODULES = {f"components.{step}" for step in STEP_ORDER}
# layer -> the layers it may import (its own included)
ALLOWED = {
    "base": {"base"},
    "core": {"base", "core"},
    "io": {"base", "core", "io"},
    "sample": {"base", "core", "io", "sample"},
    "release": {"base", "core", "io", "release"},
    "service": {"base", "core", "io", "release", "service"},
    "step": {"base", "core", "io", "sample", "release"},
    "entry": {"base", "core", "io", "sample", "release", "service", "step", "entry"},
}
ORCHESTRATORS = {"airflow", "kfp"}


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module in ENTRY:
        return "entry"
    if module in STEP_MODULES:
        return "step"
    package = module.split(".")[1]
    if package in ALLOWED and module != f"components.{package}":
        return package
    if module == f"components.{package}" and package in ALLOWED:
        return package  # a subpackage's __init__
    raise ValueError(
        f"{module} belongs to no layer: put it in core/, io/, release/ or sample/, or add "
        "it to the layers in tests/test_architecture.py"
    )


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_module_is_in_a_layer_and_imports_only_those_below(module):
    layer = layer_of(module)

    wrong = sorted(
        f"{imported} ({layer_of(imported)})"
        for imported in imports(module)
        if layer_of(imported) not in ALLOWED[layer]
    )

    assert not wrong, f"{module} ({layer}) imports {', '.join(wrong)}"


def test_no_step_imports_another_step():
    found = {
        module: sorted(imports(module) & STEP_MODULES)
        for module in STEP_MODULES
        if imports(module) & STEP_MODULES
    }

    assert found == {}


def test_the_package_imports_no_orchestrator():
    found = {
        module: sorted(external_imports(module) & ORCHESTRATORS)
        for module in modules()
        if external_imports(module) & ORCHESTRATORS
    }

    assert found == {}


def test_a_module_outside_every_layer_is_named():
    with pytest.raises(ValueError, match=r"components\.misc belongs to no layer"):
        layer_of("components.misc")
