"""Device errors: what went wrong talking to one device, as values the engine can act on.

Every error names the device (its mRID) and says why in words an operator can use. They are
exceptions so a Deferred can carry them (errback), but callers treat them as results: a meter
that does not answer is a `Timeout` on that meter, not a stack trace in a log.

Errors about one reading type rather than the whole device (`UnsupportedReadingType`,
`ObjectUnavailable`) also carry `reading_type` so the engine can put one CIM Error per type in
its reply while still returning the readings it did get.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Something failed for one device; `device_mrid` says which, `reason` says what.

    The driver adds the device's name and address (`located`) before the error leaves it, so
    an operator reading the text knows which meter and where without looking it up."""

    device_name: str | None = None
    address: str | None = None  # "host:port"

    def __init__(self, device_mrid: str, reason: str) -> None:
        super().__init__(device_mrid, reason)
        self.device_mrid = device_mrid
        self.reason = reason

    def located(self, name: str | None, address: str | None) -> "DeviceError":
        """Say which device by name and where (first one wins); returns self."""
        if self.device_name is None and self.address is None:
            self.device_name, self.address = name, address
        return self

    def __str__(self) -> str:
        where = ", ".join(part for part in (self.device_name, self.address) if part)
        device = f"{self.device_mrid} ({where})" if where else self.device_mrid
        return f"{type(self).__name__} on device {device}: {self.reason}"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class Timeout(DeviceError):
    """The device did not connect or did not answer a request within the allowed time."""


class ConnectionFailed(DeviceError):
    """No transport to the device: refused, unreachable, or closed by the other side."""


class ProtocolError(DeviceError):
    """The device sent something that is not a valid answer to what was asked."""


class CounterRejected(ProtocolError):
    """The meter refused the head-end's invocation counter as already used (exception-response
    invocation-counter-error): the head-end's counter book is behind the meter's (a store
    restored from a backup, another client with the same key). Resynchronised from the meter's
    own counter (`cimhes.drivers.security.resynchronise`)."""


class AnswerTooLarge(ProtocolError):
    """One answer grew past the configured cap on bytes or blocks (a meter streaming blocks
    forever, or a request asking far more than a meter should hold)."""


class HeadEndExhausted(DeviceError):
    """The head-end itself ran out of a resource (file descriptors, ...) while serving this
    device: the device is not at fault, and the read may be retried."""


class AssociationRefused(DeviceError):
    """The device rejected the application association (AARE result not accepted)."""

    def __init__(self, device_mrid: str, reason: str, result: int | None = None,
                 diagnostic: int | None = None) -> None:
        super().__init__(device_mrid, reason)
        self.args = (device_mrid, reason, result, diagnostic)
        # The AARE result (1 rejected-permanent, 2 rejected-transient) and the ACSE service-user
        # diagnostic (13 authentication-failure, ...), kept for callers that decide on retries.
        self.result = result
        self.diagnostic = diagnostic


class UnsupportedReadingType(DeviceError):
    """The driver has no mapping for this reading type on this device type."""

    def __init__(self, device_mrid: str, reason: str, reading_type: str) -> None:
        super().__init__(device_mrid, reason)
        self.args = (device_mrid, reason, reading_type)
        self.reading_type = reading_type


class ObjectUnavailable(DeviceError):
    """The device answered a GET for this reading type's object with a data-access error."""

    def __init__(self, device_mrid: str, reason: str, reading_type: str,
                 data_access_result: int) -> None:
        super().__init__(device_mrid, reason)
        self.args = (device_mrid, reason, reading_type, data_access_result)
        self.reading_type = reading_type
        self.data_access_result = data_access_result


class HistoryShortfall(DeviceError):
    """The meter holds fewer values of this reading type in the window than the window spans (its
    history is shorter, or rows are missing): what it has is returned, and this says what is not.
    A warning, not a failure: `missing` values, the first of them at `first_missing`."""

    def __init__(self, device_mrid: str, reason: str, reading_type: str, missing: int,
                 first_missing) -> None:
        super().__init__(device_mrid, reason)
        self.args = (device_mrid, reason, reading_type, missing, first_missing)
        self.reading_type = reading_type
        self.missing = missing
        self.first_missing = first_missing


class AuthenticationFailed(DeviceError):
    """The device and the head-end do not hold the same keys or system titles: the meter
    refused the ciphered association, or its answers do not authenticate (HLS-GMAC)."""


class ReplayDetected(DeviceError):
    """The device answered with an invocation counter not larger than the last one seen from
    it: a replayed (or forged) APDU, refused. The engine records it as a security event."""

    def __init__(self, device_mrid: str, reason: str, counter: int = 0,
                 last_seen: int = 0) -> None:
        super().__init__(device_mrid, reason)
        self.args = (device_mrid, reason, counter, last_seen)
        self.counter = counter
        self.last_seen = last_seen


class UnknownDevice(DeviceError):
    """The head-end's inventory has no device by this mRID (the CIM layer's 2.4)."""


class ControlNotConfirmed(DeviceError):
    """A control the meter accepted, whose read-back does not show the state it should have
    brought (the state read back is in the outcome)."""


class ControlCancelled(DeviceError):
    """A scheduled control cancelled before it ran; nothing was sent to the device."""


class ControlExpired(DeviceError):
    """A control not started within the allowed delay after its due time; nothing was sent."""
