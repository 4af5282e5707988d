"""The uncertainty.calibration and uncertainty.ood config sections: defaults, errors by key."""
from __future__ import annotations

from pathlib import Path

import pytest

from regfw.config.schema import load_config
from regfw.errors import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "templates" / "demo.yaml"


def test_demo_turns_on_calibration_and_the_heldout_classes_protocol():
    unc = load_config(DEMO).uncertainty
    assert unc.calibration.enabled and unc.calibration.fraction == 0.1
    assert unc.ood.enabled and unc.ood.protocol == "heldout_classes" and unc.ood.in_classes is None
    assert not load_config(DEMO, ["uncertainty.ood=null"]).uncertainty.ood.enabled
    assert not load_config(None).uncertainty.calibration.enabled  # off unless asked for


@pytest.mark.parametrize("override, message", [
    ("uncertainty.calibration.fraction=1.5",
     "uncertainty.calibration.fraction: got 1.5, expected a value in (0, 1)"),
    ("uncertainty.ood.class_path=pkg.Data",
     "uncertainty.ood: set only one of protocol (heldout_classes) or class_path"),
    ("uncertainty.ood.protocol=classes", "expected one of 'heldout_classes'"),
    ("uncertainty.plot_every=0", "uncertainty.plot_every: got 0, expected a value in > 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert message in str(err.value)


def test_an_optional_list_of_class_numbers_names_what_is_wrong_in_it():
    base = ["regularizers.dropout={}", "uncertainty.ood.protocol=heldout_classes"]
    with pytest.raises(ConfigError, match=r"^uncertainty\.ood\.in_classes\[1\]: got 'a' \(str\), expected a whole "
                                          r"number\.$"):
        load_config(None, [*base, "uncertainty.ood.in_classes=[0,a]"])
    with pytest.raises(ConfigError, match=r"^uncertainty\.ood\.in_classes: got 'foo', expected a list, or null\.$"):
        load_config(None, [*base, "uncertainty.ood.in_classes=foo"])
