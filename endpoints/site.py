"""The head-end's web site: the CIM SOAP services under /cim/<WSDL name>, wired to one engine.

`HeadEnd` assembles one process on the embedded defaults: the store (SQLite unless another URL is
given), the engine's reading service and the SOAP doors, on one reactor.
"""
from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from twisted.web.resource import Resource

from cimhes.cim.codec import encode_fault
from cimhes.drivers import DeviceAddress
from cimhes.drivers.limits import DEFAULT_CONNECTIONS_PER_SECOND, SessionLimits
from cimhes.drivers.security import DEFAULT_CLIENT_SYSTEM_TITLE, HeadEndSecurity
from cimhes.endpoints.async_replies import ReplyAddressPolicy, ReplySender
from cimhes.endpoints.auth import Doorkeeper, SoapGuard
from cimhes.endpoints import end_device_events
from cimhes.endpoints.cim_paths import CimFolder
from cimhes.endpoints import end_device_controls as controls_door
from cimhes.endpoints.http_door import DoorLimits, LimitedSite
from cimhes.endpoints.meter_readings import (
    WSDL_FILE as GET_METER_READINGS_WSDL,
)
from cimhes.endpoints.meter_readings import (
    WSDL_NAME as GET_METER_READINGS,
)
from cimhes.endpoints.meter_readings import (
    GetMeterReadingsDoor,
    ReadingRequestLimits,
    get_meter_readings_application,
)
from cimhes.endpoints.operations import Operations
from cimhes.endpoints.owed_replies import OwedReplies, OwedReplySettings
from cimhes.endpoints.reading_types import ReadingTypesResource
from cimhes.endpoints.publisher import MdmPublisher
from cimhes.endpoints.scale import ScaleSettings, engine_dispatcher, start_role
from cimhes.endpoints.soap_resource import SoapResource
from cimhes.endpoints.tls import callback_session
from cimhes.engine import request_log
from cimhes.engine.admission import Admission, RequestLimits
from cimhes.engine.controls import ControlService, ControlSettings
from cimhes.engine.dispatch import Dispatcher
from cimhes.engine.event_fetches import EventFetchService
from cimhes.engine.event_queries import EventRequestLimits
from cimhes.engine.events import EventStore
from cimhes.engine.push import PushIntake
from cimhes.engine.limits import EngineSettings
from cimhes.engine.feeder_outages import FeederOutageDetector, FeederOutageSettings
from cimhes.engine.inventory import Inventory
from cimhes.engine.reading import MeterReadingService
from cimhes.engine.rate_limits import (
    DEFAULT_CONTROL_LIMITS,
    ControlGate,
    ControlLimit,
    ControlRateLimiter,
)
from cimhes.engine.schedule import ScheduleConfig, Scheduler
from cimhes.engine.security import CounterStore, StoredCounters
from cimhes.engine.reading_sources import ReadingRequestService
from cimhes.engine.sla import SlaSettings
from cimhes.engine.store import Store, StoreRunner
from cimhes.engine.users import AuditTrail, Authenticator, Role, SecretBox, UserStore


log = logging.getLogger(__name__)


@dataclass
class HeadEndSettings:
    database_url: str = "sqlite:///var/cimhes.sqlite"
    read_concurrency: int = 200  # meter sessions open at once, over all requests
    session_limits: SessionLimits = field(default_factory=SessionLimits)
    connections_per_second: float = DEFAULT_CONNECTIONS_PER_SECOND  # new meter connections
    device_timeout: float | None = None  # short form: connect and response timeout
    # Key of the secrets the head-end must read back (PasswordDigest secrets); made if missing.
    secret_key_file: str = "var/cimhes-secret.key"
    door_limits: DoorLimits = field(default_factory=DoorLimits)  # HTTP: bodies, connections
    # CAs trusted for outgoing HTTPS callbacks (endpoints/tls.py callback_session); None: system's.
    callback_ca_bundle: str | None = None
    # Rate limits on controls (engine/rate_limits.py), applied by ControlGate.admit.
    control_limits: tuple[ControlLimit, ...] = DEFAULT_CONTROL_LIMITS
    # Control jobs: attempts per device, latest start after the due time (engine/controls.py).
    controls: ControlSettings = field(default_factory=ControlSettings)
    request_limits: RequestLimits = field(default_factory=RequestLimits)  # devices, pending
    # The head-end's DLMS system title (HLS-GMAC), 8 octets hex.
    client_system_title: str = DEFAULT_CLIENT_SYSTEM_TITLE
    # The base URL written into served WSDLs (e.g. https://hes.example.com/api); None: the
    # request's own, with Forwarded / X-Forwarded-* headers of a reverse proxy honoured.
    public_base_url: str | None = None
    reading_requests: ReadingRequestLimits = field(default_factory=ReadingRequestLimits)
    # Bounds on GetEndDeviceEvents: events per message and per request, sync time limit.
    event_requests: EventRequestLimits = field(default_factory=EventRequestLimits)
    # ReplyAddresses asynchronous requests may name (URL prefixes); empty: async is refused.
    reply_addresses: tuple[str, ...] = ()
    # Bounds on EndDeviceControls requests: the synchronous time limit (4.1), the polling.
    control_requests: "controls_door.ControlRequestLimits" = field(
        default_factory=lambda: controls_door.ControlRequestLimits())
    # How owed asynchronous replies are held (lease) and retried (endpoints/owed_replies.py).
    owed_replies: OwedReplySettings = field(default_factory=OwedReplySettings)
    # MDM endpoints (name, ReceiveMeterReadings URL) every new reading is published to.
    subscribers: tuple[tuple[str, str], ...] = ()
    # MDM endpoints (name, ReceiveEndDeviceEvents URL) every new end-device event is published to.
    event_subscribers: tuple[tuple[str, str], ...] = ()
    publish_first_retry: float = 2.0  # s before the first retry; doubled each time, <= 10 min
    # The engine's other bounds: per route, per device, retries, re-reads (docs/architecture.md).
    engine: EngineSettings = field(default_factory=EngineSettings)
    # Read schedules (engine/schedule.py) run as they fall due; None: none.
    schedules_file: str | None = None
    # What the SLA report counts as complete and in time (engine/sla.py).
    sla: SlaSettings = field(default_factory=SlaSettings)
    # The RabbitMQ broker (amqp://user:pass@host:port/vhost) for CIM requests over queues and
    # events to the DMS (cimhes.queue, docs/amqp.md); None: AMQP is off.
    amqp_url: str | None = None
    # Feeder-outage summaries (engine/feeder_outages.py): meters per feeder within a window.
    feeder_outages: FeederOutageSettings = field(default_factory=FeederOutageSettings)
    # Scale-out (endpoints/scale.py): "all" (one process), "api" (doors, jobs written and handed
    # out over RabbitMQ) or "engine" (jobs taken from RabbitMQ and run); docs/architecture.md.
    scale: "ScaleSettings" = field(default_factory=lambda: ScaleSettings())


class _Index(Resource):
    def __init__(self, services: list[str]):
        super().__init__()
        self._services = services

    def render_GET(self, request):
        request.setHeader("content-type", "text/html; charset=utf-8")
        items = "".join(
            f'<li><a href="/cim/{html.escape(n)}?wsdl">{html.escape(n)}</a> (WSDL)</li>'
            for n in self._services)
        return (f"<!doctype html><title>cimhes</title><h1>cimhes head-end</h1>"
                f"<p>IEC 61968-9 services (SOAP 1.1):</p><ul>{items}</ul>").encode()


class HeadEnd:
    """One head-end process: store (loaded with the inventory's devices), engine and SOAP site
    on the given reactor."""

    def __init__(self, reactor, settings: HeadEndSettings,
                 devices: Inventory | list[DeviceAddress], links: Mapping | None = None):
        secret_box = SecretBox.from_file(settings.secret_key_file)
        self.store = Store(settings.database_url, secret_box)
        # Before any thread starts: a refused inventory must leave nothing running.
        if links:  # routes, groups, usage points given apart from the devices
            devices = Inventory.with_links(devices, links)
        self.role = settings.scale.role
        if devices is not None:
            self.store.load_inventory(devices)
        # An engine beside api processes must not judge their requests.
        interrupted = request_log.mark_interrupted(self.store) if self.role != "engine" else 0
        if interrupted:
            log.warning("%d requests were in flight when the previous process stopped; they are "
                        "logged as %r", interrupted, request_log.INTERRUPTED)
        self.users = UserStore(self.store, secret_box)
        self.store_runner = StoreRunner(reactor, self.store)
        # Pushes from the inventory's devices (the CLI starts the listener: push_options.py).
        # The one EventStore: pushes, log reads and GetEndDeviceEvents share it; it writes the
        # outbox rows for the DMS and for each event subscriber (engine/event_outbox.py).
        self.events = EventStore(self.store, [name for name, _ in settings.event_subscribers],
                                 feeders=FeederOutageDetector(settings.feeder_outages))
        self.push_intake = PushIntake(
            self.store_runner, self.events,
            [d.address for d in devices.devices] if isinstance(devices, Inventory)
            else devices or [])  # an engine started without an inventory knows no pushers
        # The one factory of HTTP sessions for outgoing calls (MDM callbacks, zeep publishers).
        self.callback_session = partial(callback_session, settings.callback_ca_bundle)
        self.counters = StoredCounters(self.store_runner, CounterStore(self.store))
        security = HeadEndSecurity(bytes.fromhex(settings.client_system_title), self.counters)
        self.meter_security = security  # also the push recovery's (endpoints/push_options.py)
        self.audit = AuditTrail(self.store_runner, self.users)
        # The control service's hook: rate limits before a control, audit of each outcome.
        self.control_gate = ControlGate(
            ControlRateLimiter(settings.control_limits, reactor.seconds), self.audit)
        # Metrics, request log, device status, health and the operator's pages.
        self.operations = Operations(reactor, self.store, self.store_runner)
        self.doorkeeper = Doorkeeper(Authenticator(self.store_runner, self.users), self.audit,
                                     self.operations.metrics)
        self.dispatcher = engine_dispatcher(
            reactor, self.store_runner, settings.scale, settings.engine,
            max_sessions=settings.read_concurrency,
            session_limits=(settings.session_limits if settings.device_timeout is None
                            else SessionLimits.of(settings.device_timeout)),
            connections_per_second=settings.connections_per_second, security=security,
            observer=self.operations.device_outcomes)
        # Meter controls as durable jobs on the same dispatcher (engine/controls.py); made
        # before the dispatcher starts, so resumed control jobs find their runner.
        self.controls = ControlService(reactor, self.store_runner, self.dispatcher,
                                       settings=settings.controls, gate=self.control_gate)
        # Event-log fetches as durable jobs on the same dispatcher (engine/event_fetches.py).
        self.event_fetches = EventFetchService(reactor, self.store_runner, self.dispatcher,
                                               self.events)
        # Role "all": one engine owns this store, so what an earlier process left running is
        # requeued first (a fed engine or an api process never requeues: endpoints/scale.py).
        self.dispatcher.start(requeue=True)
        reactor.addSystemEventTrigger("before", "shutdown", self.dispatcher.stop)
        self.readings = MeterReadingService(reactor, self.store_runner,
                                            dispatcher=self.dispatcher)
        self.scheduler = None
        if settings.schedules_file and self.role != "engine":
            self.scheduler = Scheduler(reactor, self.store_runner, self.dispatcher,
                                       ScheduleConfig.from_file(settings.schedules_file))
            self.scheduler.start()
            reactor.addSystemEventTrigger("before", "shutdown", self.scheduler.stop)
        self.admission = Admission(settings.request_limits)
        self.publisher = MdmPublisher(
            reactor, self.store_runner, dict(settings.subscribers), self.callback_session,
            first_retry=timedelta(seconds=settings.publish_first_retry))
        if self.role != "engine":  # one publisher per destination
            reactor.callWhenRunning(self.publisher.start)  # and delivers what a last run left
        # Asynchronous replies owed, kept until taken and carried on by one process at a time
        # (endpoints/owed_replies.py); shared by the three doors.
        self.owed_replies = OwedReplies(reactor, self.store_runner, settings.owed_replies,
                                        reply_addresses=ReplyAddressPolicy(settings.reply_addresses))
        if self.role != "engine":  # the doors' processes owe the replies
            reactor.callWhenRunning(self.owed_replies.start)
        door = GetMeterReadingsDoor(ReadingRequestService(self.readings, self.store_runner,
                                                          on_read=self.publisher.publish),
                                    self.store_runner, reactor=reactor, admission=self.admission,
                                    limits=settings.reading_requests,
                                    replies=ReplySender(reactor, self.callback_session),
                                    reply_addresses=ReplyAddressPolicy(settings.reply_addresses),
                                    owed=self.owed_replies)
        self.meter_readings_door = door
        cim = CimFolder()
        # GetEndDeviceEvents (endpoints/end_device_events.py) at /cim/GetEndDeviceEvents.
        self.end_device_events_door = end_device_events.mount(self, reactor, settings, cim)
        # ExecuteEndDeviceControls (endpoints/end_device_controls.py) at
        # /cim/ExecuteEndDeviceControls: roles and rate limits at the door, the controls as the
        # engine's durable jobs (self.controls), outcomes read back from the meters.
        self.end_device_controls_door = controls_door.mount(self, reactor, settings, cim)
        self.amqp = None
        if settings.amqp_url and self.role != "engine":
            from cimhes.queue.authorisation import AmqpDoorkeeper, handler_checks_roles
            from cimhes.queue.service import AmqpService
            # Each Noun served over AMQP: its handler, and the role its AMQP user must hold.
            self.amqp = AmqpService(reactor, settings.amqp_url,
                                    {"MeterReadings": door.get_meter_readings,
                                     "EndDeviceEvents":
                                         self.end_device_events_door.get_end_device_events,
                                     "EndDeviceControls":
                                         self.end_device_controls_door.amqp_handler},
                                    store_runner=self.store_runner,
                                    doorkeeper=AmqpDoorkeeper(
                                        self.store_runner, self.users, self.audit,
                                        {"MeterReadings": Role.READINGS_READER,
                                         "EndDeviceEvents": Role.EVENTS_READER,
                                         "EndDeviceControls": handler_checks_roles}))
            reactor.callWhenRunning(self.amqp.start)
        cim.putChild(GET_METER_READINGS.encode(),
                     SoapResource(get_meter_readings_application(door), GET_METER_READINGS_WSDL,
                                  SoapGuard(self.doorkeeper,
                                            {"GetMeterReadings": Role.READINGS_READER},
                                            encode_fault),
                                  public_base_url=settings.public_base_url,
                                  observer=self.operations.requests))
        # What the head-end serves, as the WSDLs: public, no credentials needed.
        cim.putChild(b"reading-types", ReadingTypesResource())
        root = _Index([GET_METER_READINGS, end_device_events.WSDL_NAME,
                       controls_door.WSDL_NAME])
        if self.role != "engine":  # an engine takes its work from the queue only
            root.putChild(b"cim", cim)
        self.scale = start_role(reactor, self, settings)
        root.putChild(b"", root)
        self.operations.mount(root, doorkeeper=self.doorkeeper, readings=self.readings,
                              sla_settings=settings.sla,
                              groups=self.operations.statuses.groups, broker=self.amqp)
        self.site = LimitedSite(root, settings.door_limits)
        self.site.displayTracebacks = False
