"""IDIS event codes -> CIM EndDeviceEventType: the one table, each row with its source.

`IDIS_EVENT_TYPES` maps the event code an IDIS meter writes into its event logs (the event code
column of the standard, fraud detection, disconnector control and power quality logs) to the
EndDeviceEventType ``type.domain.subDomain.eventOrAction`` the head-end reports. A code not in the
table is still reported, typed `UNMAPPED_EVENT_TYPE` and carrying its raw code, never dropped.

Sources, as each row names them:
- "IDIS": the code's meaning, from the IDIS event code lists collected in
  ../shared/design/REFERENCE-FACTS.md (public IDIS head-end code: OSGP EventType and others).
- "Connexo <name>": the EndDeviceEventType a public head-end assigns to the same event, in
  chandangeek/Connexo_Code upl/com.energyict.mdc.upl/src/main/java/com/energyict/cim/
  EndDeviceEventTypeFactory.java (method <name>); REFERENCE-FACTS.md quotes several of them.
  That source types most meter events with EndDeviceType 0 (not applicable); here the type is 3
  (electric meter, 61968-9 EndDeviceType), domain, subdomain and event/action kept.
- "composed": no public mapping was found for this code; the row combines the domain,
  subdomain and event/action values the cited rows use for the same thing (named in the row).
  Check these against 61968-9 Annex E before relying on them.

EndDeviceType 3 = electric meter; domains used: 2 battery, 7 configuration, 11 firmware, 12
security, 15 load control, 16 load profile, 17 event log/alarms, 18 memory, 20 TOU, 21 metrology,
26 power, 31 RCD switch, 36 clock, 37 watchdog.
"""

from __future__ import annotations

from dataclasses import dataclass

from cimhes.cim.end_device_events import check_event_type

__all__ = ["IdisEventType", "IDIS_EVENT_TYPES", "UNMAPPED_EVENT_TYPE", "event_type_for",
           "LONG_POWER_FAILURE"]

# An event the table does not know: electric meter, every other part "not applicable" (0).
UNMAPPED_EVENT_TYPE = "3.0.0.0"


@dataclass(frozen=True)
class IdisEventType:
    code: int
    log: str  # which IDIS event log writes it: standard, fraud, disconnector, power quality
    meaning: str
    event_type: str
    source: str

    def __post_init__(self) -> None:
        check_event_type(self.event_type)


def _rows(log: str, *rows: tuple[int, str, str, str]) -> list[IdisEventType]:
    return [IdisEventType(code, log, meaning, event_type, source)
            for code, meaning, event_type, source in rows]


_C = "Connexo "
_STANDARD = _rows(
    "standard",
    (1, "power down", "3.26.38.85", _C + "getPowerDownEventType; REFERENCE-FACTS 1 -> 0.26.38.85"),
    (2, "power up", "3.26.38.49", _C + "getPowerUpEventType; REFERENCE-FACTS 2 -> 0.26.38.49"),
    (3, "daylight saving time change", "3.36.56.24", _C + "getDaylightSavingTimeEnabledOrDisabledEventType"),
    (4, "clock adjusted (old time)", "3.36.116.14", _C + "getSetClockBeforeEventType"),
    (5, "clock adjusted (new time)", "3.36.116.24", _C + "getSetClockAfterEventType"),
    (6, "clock invalid", "3.36.114.35", _C + "getClockInvalidEventType"),
    (7, "replace battery", "3.2.0.85", _C + "getReplaceBatteryEventType"),
    (8, "battery voltage low", "3.2.22.150", _C + "getBatteryVoltageLowEventType"),
    (9, "TOU activated", "3.20.121.4", _C + "getTouActivatedEventType"),
    (10, "error register cleared", "3.17.89.28", _C + "getErrorRegisterClearedEventType"),
    (11, "alarm register cleared", "3.17.285.28", _C + "getAlarmRegisterClearedEventType"),
    (12, "program memory error", "3.18.83.79", _C + "getProgramMemoryErrorEventType"),
    (13, "RAM error", "3.18.85.79", _C + "getRamMemoryErrorEventType"),
    (14, "NV memory error", "3.18.72.79", _C + "getNvMemoryErrorEventType"),
    (15, "watchdog error", "3.37.3.79", _C + "getWatchdogErrorEventType"),
    (16, "measurement system error", "3.21.67.79", _C + "getMeasurementSystemErrorEventType"),
    (17, "firmware ready for activation", "3.11.283.280", _C + "getFirmwareReadyForActivationEventType"),
    (18, "firmware activated", "3.11.283.4", _C + "getFirmwareActivatedEventType"),
    (19, "passive TOU programmed", "3.20.121.24",
     "composed: TOU domain/subdomain 20.121 of getTouActivatedEventType, event 24 (changed) of "
     "getConfigurationChangeEventType"),
    (47, "parameters changed", "3.7.31.24", _C + "getConfigurationChangeEventType"),
    (48, "global key changed", "3.12.32.24", _C + "getDlmsKeysUpdatedEventType"),
    (51, "firmware verification failed", "3.11.283.85",
     "composed: firmware 11.283 of getFirmwareActivatedEventType, event 85 (failed) of "
     "getPowerDownEventType"),
    (254, "load profile cleared", "3.16.87.28", _C + "getLoadProfileClearedEventType"),
    (255, "event log cleared", "3.17.44.28", _C + "getEventLogClearedEventType"),
)
_FRAUD = _rows(
    "fraud",
    (40, "terminal cover removed", "3.12.29.212", "REFERENCE-FACTS 40 -> 0.12.29.212"),
    (41, "terminal cover closed", "3.12.29.16", _C + "getTerminalCoverClosedEventType"),
    (42, "strong DC field detected", "3.12.66.242", _C + "getStrongDCFieldDetectedEventType"),
    (43, "no strong DC field anymore", "3.12.66.243", _C + "getNoStrongDCFieldAnymoreEventType"),
    (44, "meter cover removed", "3.12.141.212", _C + "getCoverOpenedEventType; REFERENCE-FACTS 44"),
    (45, "meter cover closed", "3.12.141.16", _C + "getMeterCoverClosedEventType"),
    (46, "association authentication failure", "3.12.1.85", _C + "getDlmsAuthenticationFailureEventType"),
    (49, "decryption or authentication failure", "3.12.16.79", _C + "getDlmsCipheringErrorEventType"),
    (50, "replay attack", "3.12.74.35", _C + "getReplayAttackEventType"),
)
_DISCONNECTOR = _rows(
    "disconnector",
    (59, "ready for reconnection", "3.31.26.280",
     "composed: RCD switch 31.26 of getRemoteConnectionEventType, event 280 (ready) of "
     "getFirmwareReadyForActivationEventType"),
    (60, "manual disconnection", "3.15.26.68", _C + "getManualDisconnectionEventType; REFERENCE-FACTS 60"),
    (61, "manual connection", "3.15.26.42", _C + "getManualConnectionEventType"),
    (62, "remote disconnection", "3.31.26.68", _C + "getRemoteDisconnectionEventType; REFERENCE-FACTS 62"),
    (63, "remote connection", "3.31.26.42", _C + "getRemoteConnectionEventType; REFERENCE-FACTS 63"),
    (64, "local disconnection", "3.15.26.68", _C + "getLocalDisconnectionEventType"),
    (65, "limiter threshold exceeded", "3.15.261.139", _C + "getLimiterThresholdExceededEventType"),
    (66, "limiter threshold ok", "3.15.261.216", _C + "getLimiterThresholdOkEventType"),
    (67, "limiter threshold changed", "3.15.261.24", _C + "getLimiterThresholdChangedEventType"),
    (68, "disconnect/reconnect failure", "3.31.26.85",
     "composed: RCD switch 31.26 of getRemoteDisconnectionEventType, event 85 (failed)"),
    (69, "local reconnection", "3.15.26.42",
     "composed: as manual connection (getManualConnectionEventType), as the source types local "
     "disconnection like manual disconnection"),
)
_POWER_QUALITY = _rows(
    "power quality",
    (76, "undervoltage L1", "3.26.131.223", _C + "getSagEventPhaseA; REFERENCE-FACTS 76 -> 0.26.131.223"),
    (77, "undervoltage L2", "3.26.132.223", _C + "getSagEventPhaseB"),
    (78, "undervoltage L3", "3.26.133.223", _C + "getSagEventPhaseC"),
    (79, "overvoltage L1", "3.26.131.248",
     "composed: phase A voltage 26.131 of getSagEventPhaseA, event 248 (swell) of getVoltageSwellEventType"),
    (80, "overvoltage L2", "3.26.132.248", "composed: as 79 with phase B voltage 26.132 (getSagEventPhaseB)"),
    (81, "overvoltage L3", "3.26.133.248", "composed: as 79 with phase C voltage 26.133 (getSagEventPhaseC)"),
    (82, "missing voltage L1", "3.26.131.285", "REFERENCE-FACTS 82 -> 0.26.131.285"),
    (83, "missing voltage L2", "3.26.132.285", "composed: as 82 with phase B voltage 26.132 (getSagEventPhaseB)"),
    (84, "missing voltage L3", "3.26.133.285", "composed: as 82 with phase C voltage 26.133 (getSagEventPhaseC)"),
    (85, "voltage L1 normal", "3.26.131.216",
     "composed: phase A voltage 26.131, event 216 (restored/ok) of getLimiterThresholdOkEventType"),
    (86, "voltage L2 normal", "3.26.132.216", "composed: as 85 with phase B voltage 26.132"),
    (87, "voltage L3 normal", "3.26.133.216", "composed: as 85 with phase C voltage 26.133"),
)

IDIS_EVENT_TYPES: dict[int, IdisEventType] = {
    row.code: row for row in (*_STANDARD, *_FRAUD, *_DISCONNECTOR, *_POWER_QUALITY)}

# A row of the power failure event log (end of a long power failure, with its duration).
LONG_POWER_FAILURE = IdisEventType(
    0, "power failure", "long power failure (duration in the event's details)", "3.26.38.85",
    "Connexo getPowerDownEventType (the power failure the row records)")


def event_type_for(code: int) -> str:
    """The EndDeviceEventType of IDIS event `code`; `UNMAPPED_EVENT_TYPE` when unknown."""
    row = IDIS_EVENT_TYPES.get(code)
    return row.event_type if row is not None else UNMAPPED_EVENT_TYPE


# IDIS alarm register 1 (0.0.97.98.0.255) bits -> EndDeviceEventType, for alarm pushes. Bit
# meanings as in the IDIS / DSMR alarm register 1 lists of public head-ends (OSGP AlarmType):
# verify against the IDIS companion specification; types as the event-log rows of the same
# events above. A set bit not in this table is kept typed UNMAPPED_EVENT_TYPE.
IDIS_ALARM_BITS: dict[int, IdisEventType] = {row.code: row for row in _rows(
    "alarm register 1",
    (0, "clock invalid", "3.36.114.35", "as event code 6 (Connexo getClockInvalidEventType)"),
    (1, "replace battery", "3.2.0.85", "as event code 7 (Connexo getReplaceBatteryEventType)"),
    (2, "power up", "3.26.38.49", "as event code 2 (Connexo getPowerUpEventType)"),
    (8, "program memory error", "3.18.83.79", "as event code 12"),
    (9, "RAM error", "3.18.85.79", "as event code 13"),
    (10, "NV memory error", "3.18.72.79", "as event code 14"),
    (11, "measurement system error", "3.21.67.79", "as event code 16"),
    (12, "watchdog error", "3.37.3.79", "as event code 15"),
    (13, "fraud attempt", "3.12.43.257", "Connexo getTamperEventType"),
)}
