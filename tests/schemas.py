"""Schema oracles for tests: the project's own XSDs, and the reference XSDs in ../shared.

The reference schemas are other parties' material kept beside the project (never copied into it);
where that folder is absent, tests that need nothing but the reference skip with this reason.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import xmlschema

from cimhes import xsd

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "iec61968"
NO_REFERENCE = f"reference schemas not found at {REFERENCE} (they live in the shared/ folder beside the repository)"

# Which reference file describes the root element of each namespace we produce or accept.
REFERENCE_FILES = {
    "http://iec.ch/TC57/2011/GetMeterReadingsMessage":
        "connexo-2014-metering-cim/GetMeterReadingsMessage.xsd",
}


def reference_available() -> bool:
    return REFERENCE.is_dir()


def require_reference() -> None:
    if not reference_available():
        pytest.skip(NO_REFERENCE)


@lru_cache(maxsize=None)
def reference_schema(relative: str) -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(REFERENCE / relative), allow="local")


def validate_against_reference(element) -> None:
    namespace = element.tag[1:].split("}")[0]
    reference_schema(REFERENCE_FILES[namespace]).validate(element)


def assert_valid_everywhere(element) -> None:
    """Valid against our own schemas always, and against the reference ones where they exist."""
    xsd.schema("GetMeterReadingsMessage.xsd").assertValid(element)
    if reference_available():
        validate_against_reference(element)
