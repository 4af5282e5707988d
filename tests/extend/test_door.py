"""``regfw.extend``, the one door for plugin authors; the old module paths, kept for one release."""
from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import warnings

import pytest

import regfw.extend as door
from regfw._moved import MOVED
from regfw.extend import HIDDEN, INPUT, InjectingRegularizer, InjectionConfig, RateRange


def test_every_name_of_the_door_resolves_and_imports_nothing_until_used():
    assert [name for name in door.__all__ if not hasattr(door, name)] == []
    code = ("import sys, regfw.extend; print(sorted(m for m in ('torch', 'pytorch_lightning', "
            "'regfw.placement.surgery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_old_module_path_still_imports_with_a_deprecation_warning():
    """In a fresh interpreter, so that each old name is imported for the first time. An old module
    that is a package of the same name now (``regfw.config``) is the next test's."""
    old = sorted(o for o in MOVED if MOVED[o].rsplit(".", 1)[0] != o)
    assert len(old) >= 40
    code = ("import importlib, warnings\n"
            f"for old, new in {[(o, MOVED[o]) for o in old]!r}:\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        module = importlib.import_module(old)\n"
            "    said = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
            "    print(old, module is importlib.import_module(new), said[:1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == len(old)
    for line, name in zip(lines, old, strict=True):
        assert line.startswith(f"{name} True ['{name} moved to {MOVED[name]}; the old path is removed"), line


@pytest.mark.parametrize("package,name", [("regfw.config", "load_config"), ("regfw.run", "fit"),
                                          ("regfw.placement", "model_map"), ("regfw.registry", "get_registry"),
                                          ("regfw.cli", "build_parser")])
def test_a_name_of_an_old_module_that_is_a_package_now_resolves_with_a_warning(package, name):
    module = importlib.import_module(package)
    with pytest.warns(DeprecationWarning, match=rf"{package}\.{name} moved to {MOVED[package]}\.{name}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(MOVED[package]), name)


def test_rate_fields_are_generated_from_the_kinds_declared_once():
    class Plain(InjectingRegularizer):
        name = "plain_noise"
        kinds = (INPUT, HIDDEN)

    @dataclasses.dataclass
    class TunedConfig(InjectionConfig):
        scale: float = 2.0

    class Tuned(InjectingRegularizer):
        name = "tuned_noise"
        kinds = (HIDDEN,)
        Config = TunedConfig
        rate_ranges = {HIDDEN: RateRange(0.05, 0.1, 0.1)}

    fields = {f.name: f for f in dataclasses.fields(Plain.Config)}
    assert {"policy", "existing", "schedule", "input", "hidden"} <= set(fields)
    assert fields["hidden"].default is None and fields["hidden"].metadata["range"][:2] == (0.0, 1.0)
    assert "after hidden Linear layers (range: 0.3-0.5)" in fields["hidden"].metadata["doc"]
    assert Tuned.Config is TunedConfig  # a declared Config gets the fields in place
    assert TunedConfig(hidden=0.07, scale=1.0).hidden == 0.07
    assert "(range: 0.05-0.1)" in {f.name: f for f in dataclasses.fields(TunedConfig)}["hidden"].metadata["doc"]
    assert [f.name for f in dataclasses.fields(InjectionConfig)] == ["policy", "existing", "schedule"]


def test_the_built_in_dropout_declares_its_kinds_once():
    from regfw.registry.regularizers import get_registry

    spec = get_registry().get("dropout")
    names = [f.name for f in dataclasses.fields(spec.cls.Config)]
    assert set(spec.cls.kinds) <= set(names) and "inverted" in names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.cls(spec.cls.Config(hidden=0.4, conv=0.0))
