"""Quantity fields (resources.cpu/memory, engine cpu/memory/shmSize, modelCache.sizeLimit, env divisor) take what
Kubernetes reads as a quantity, and nothing else: `memory: 4GB` used to pass `loraplane validate` and admission
(the CRD took any int-or-string), and the API server refused the trainer Job built from it only then."""

from __future__ import annotations

import re

import pytest
import yaml
from pydantic import ValidationError

from loraplane.api import parse
from loraplane.api.common import QUANTITY_PATTERN
from loraplane.api.validation import format_validation_error
from support.paths import ROOT

QUICKSTART = list(yaml.safe_load_all((ROOT / "docs" / "examples" / "quickstart.yaml").read_text()))
JOB, ROUTE = QUICKSTART[1], QUICKSTART[2]

# "+1" and "1." too: apimachinery's ParseQuantity reads a leading + and a trailing dot (pods take them).
GOOD = [8, "8", "500m", "64Gi", "64G", "1e3", "0.5", ".5", "1.5Gi", "100k", "0", "+1", "+500m", "1.", "1E3", "1e-3",
        "1u", "1n"]
BAD = ["4GB", "4 Gi", "lots", "4GiB", "", "Gi", "-1", "-4Gi", "1.2.3", "4gi"]


def _job(memory) -> dict:
    import copy

    job = copy.deepcopy(JOB)
    job["spec"]["resources"]["memory"] = memory
    return job


@pytest.mark.parametrize("value", GOOD)
def test_a_kubernetes_quantity_is_taken(value):
    assert parse(_job(value)).spec.resources.memory == value


@pytest.mark.parametrize("value", BAD)
def test_what_kubernetes_does_not_read_as_a_quantity_is_refused_with_the_fix(value):
    with pytest.raises(ValidationError) as err:
        parse(_job(value))
    text = format_validation_error(err.value)
    assert text.startswith("spec.resources.memory: "), text
    assert "is not a Kubernetes quantity" in text or "is negative" in text, text


def test_every_quantity_field_is_checked_and_the_crd_says_the_same():
    import copy

    route = copy.deepcopy(ROUTE)
    route["spec"]["engine"].update({"cpu": "2 cores", "shmSize": "1GB"})
    route["spec"]["router"]["memory"] = "1 Gi"
    with pytest.raises(ValidationError) as err:
        parse(route)
    fields = {line.split(":")[0] for line in format_validation_error(err.value).splitlines()}
    assert fields == {"spec.engine.cpu", "spec.engine.shmSize", "spec.router.memory"}, fields
    # The CRD's pattern (what admission checks on a string) agrees with the model on every case.
    crd = (ROOT / "crds" / "loraplane.io_finetunejobs.yaml").read_text()
    assert QUANTITY_PATTERN.replace("\\", "\\\\") in crd or QUANTITY_PATTERN in crd
    for value in GOOD + BAD:
        if isinstance(value, str):
            assert bool(re.fullmatch(QUANTITY_PATTERN, value)) == (value in GOOD), value
