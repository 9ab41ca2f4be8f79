"""Where the tests find ../shared, and the schema oracles built from it.

The reference schemas and samples are other parties' material kept beside the project (never
copied into it). A test that needs one of them skips, saying where it looked, when the folder is
absent; `assert_valid_everywhere` checks our own schema always and the reference where present.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
from lxml import etree

from cimhes import xsd

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "iec61968"
SAMPLES = SHARED / "reference" / "iec61968-samples"
GET_METER_READINGS_MESSAGE = ("connexo-2014-metering-cim", "GetMeterReadingsMessage.xsd")


def shared_file(folder: Path, *parts: str) -> Path:
    """A file under ../shared, or a skip that says where it was looked for."""
    location = folder.joinpath(*parts)
    if not location.exists():
        pytest.skip(f"{location} not found: the shared/ folder is not checked out beside "
                    "the repository")
    return location


def reference(*parts: str) -> Path:
    return shared_file(REFERENCE, *parts)


def sample(name: str) -> bytes:
    return shared_file(SAMPLES, name).read_bytes()


@lru_cache(maxsize=None)
def _compiled(location: Path) -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True, resolve_entities=False)
    return etree.XMLSchema(etree.parse(str(location), parser))


def reference_schema() -> etree.XMLSchema:
    """The standard's GetMeterReadingsMessage schema set, compiled from ../shared (or a skip)."""
    return _compiled(reference(*GET_METER_READINGS_MESSAGE))


def assert_valid_everywhere(element) -> None:
    """Valid against our own schemas always, and against the reference ones where they exist."""
    xsd.schema("GetMeterReadingsMessage.xsd").assertValid(element)
    location = REFERENCE.joinpath(*GET_METER_READINGS_MESSAGE)
    if location.exists():
        _compiled(location).assertValid(element)


# The EndDeviceControls oracles: the final 2011 message wrappers (connexo set) and the pristine
# CIM15 EndDeviceControls profile (cim4 set, whose own wrappers are the 2017 draft's).
END_DEVICE_CONTROLS_MESSAGE = ("connexo", "comu-outbound", "enddevicecontrols", "xsd",
                               "EndDeviceControlsMessage.xsd")
END_DEVICE_CONTROLS_PROFILE = ("cim4-61968-100", "xsd", "EndDeviceControls.xsd")


def assert_controls_valid_everywhere(element) -> None:
    """An EndDeviceControlsMessage element valid against our schema always, and against the
    reference message schema and (for its Payload) the pristine profile where they exist."""
    xsd.schema("EndDeviceControlsMessage.xsd").assertValid(element)
    message = REFERENCE.joinpath(*END_DEVICE_CONTROLS_MESSAGE)
    if message.exists():
        _compiled(message).assertValid(element)
    profile = REFERENCE.joinpath(*END_DEVICE_CONTROLS_PROFILE)
    payload = element.find("{*}Payload/{http://iec.ch/TC57/2011/EndDeviceControls#}EndDeviceControls")
    if profile.exists() and payload is not None:
        _compiled(profile).assertValid(etree.ElementTree(payload))
