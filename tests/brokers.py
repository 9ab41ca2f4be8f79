"""The RabbitMQ broker the AMQP tests run against: a real server, one fresh vhost per test.

`scripts/test` starts it (`scripts/rabbitmq`) and names it in CIMHES_TEST_RABBITMQ (the URL of
its "/" vhost); without it the AMQP tests skip, saying so. Each test gets its own vhost
(``cimhes-test-<pid>-<random>``), so durable exchanges and queues of parallel runs never meet,
and deletes it at its end.
"""
from __future__ import annotations

import os
import secrets
import subprocess
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

RABBITMQ_ENV = "CIMHES_TEST_RABBITMQ"


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


class TestVhost:
    """A vhost of the test broker; `url` connects to it as the broker's user."""

    __test__ = False

    def __init__(self, base_url: str):
        self.name = f"cimhes-test-{os.getpid()}-{secrets.token_hex(4)}"
        parts = urlsplit(base_url)
        self.user = parts.username or "guest"
        self.url = urlunsplit(parts._replace(path="/" + quote(self.name, safe="")))
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, self.user, ".*", ".*", ".*")

    def user_url(self) -> tuple[str, str]:
        """(URL, password) of a new user of this vhost with a random password (deleted with it;
        its name is `extra_user`)."""
        user = f"{self.name}-user"
        # hex: a URL-safe token may begin with "-", which rabbitmqctl reads as an option
        password = "p" + secrets.token_hex(12)
        rabbitmqctl("add_user", user, password)
        self.extra_user = user  # only once it exists: delete() removes it
        rabbitmqctl("set_permissions", "-p", self.name, self.extra_user, ".*", ".*", ".*")
        parts = urlsplit(self.url)
        netloc = f"{quote(self.extra_user, safe='')}:{password}@{parts.hostname}:{parts.port or 5672}"
        return urlunsplit(parts._replace(netloc=netloc)), password

    def delete(self) -> None:
        rabbitmqctl("delete_vhost", self.name)
        if getattr(self, "extra_user", None):
            rabbitmqctl("delete_user", self.extra_user)


@pytest.fixture
def amqp_vhost():
    base = os.environ.get(RABBITMQ_ENV)
    if not base:
        pytest.skip(f"{RABBITMQ_ENV} names no RabbitMQ broker (scripts/test starts one)")
    vhost = TestVhost(base)
    yield vhost
    vhost.delete()


def ask(url: str, exchange: str, routing_key: str, body: bytes, *, correlation_id=None,
        reply=True, timeout: float = 30.0, user_id: str | None = "connection's"):
    """Publish ``body`` as an integrator would (blocking pika; run it in a thread) and return
    (properties, body) of the answer on a private reply queue, or None when ``reply`` is False.
    ``user_id`` (the AMQP property cimhes takes the caller from) is the URL's user unless given;
    None sends none."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        reply_to = None
        if reply:
            reply_to = channel.queue_declare("", exclusive=True).method.queue
        if user_id == "connection's":
            user_id = pika.URLParameters(url).credentials.username
        channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(
            reply_to=reply_to, correlation_id=correlation_id, delivery_mode=2, user_id=user_id))
        if not reply:
            return None
        for method, props, answer in channel.consume(reply_to, auto_ack=True,
                                                     inactivity_timeout=timeout):
            if method is None:
                raise AssertionError(f"no answer on {reply_to} within {timeout} s")
            return props, answer
    finally:
        connection.close()


def take(url: str, queue: str, count: int, timeout: float = 30.0):
    """The next ``count`` messages (method, properties, body) of ``queue``, acknowledged."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        found = []
        for method, props, body in channel.consume(queue, inactivity_timeout=timeout):
            if method is None:
                break
            channel.basic_ack(method.delivery_tag)
            found.append((method, props, body))
            if len(found) >= count:
                break
        channel.cancel()
        return found
    finally:
        connection.close()


# ------------------------------------------------------------------ a broker a test may stop

RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"  # Debian's rabbitmq-server, without its user-switching wrapper
OWN_BROKER_HOST = "127.0.24.1"  # this suite's loopback range for brokers it starts itself


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class _BootFailed(RuntimeError):
    """The node's process ended while booting (e.g. a port taken since it was chosen)."""


class OwnBroker:
    """A RabbitMQ node of the test's own (node name, ports, data directory, Erlang cookie under
    ``folder``), started from Debian's rabbitmq-server, which the test may stop and start at will.
    The shared broker of the run is never touched: every command names this node (``-n``)."""

    __test__ = False

    def __init__(self, folder):
        import pathlib

        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.node = f"cimhes-test-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.port = _free_port(OWN_BROKER_HOST)
        self.url = f"amqp://guest:guest@{OWN_BROKER_HOST}:{self.port}/%2F"
        self.env = {**os.environ, "HOME": str(self.folder), "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_NODE_IP_ADDRESS": OWN_BROKER_HOST,
                    "RABBITMQ_NODE_PORT": str(self.port),
                    # Erlang distribution listens on every interface: free on all of them
                    # (a port free on OWN_BROKER_HOST alone was once taken on localhost).
                    "RABBITMQ_DIST_PORT": str(_free_port("")),
                    "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.folder / "log"),
                    "RABBITMQ_PID_FILE": str(self.folder / "rabbitmq.pid"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq"),
                    "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.folder / "advanced.config"),
                    # a node that fails to boot writes its crash dump here, not into the cwd
                    "ERL_CRASH_DUMP": str(self.folder / "erl_crash.dump")}
        self.process = None

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([f"{RABBITMQ_BIN}/rabbitmqctl", "-q", "-n", self.node, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node} failed: "
                               f"{done.stderr.strip()[-500:]}")
        return done.stdout

    def start(self, timeout: float = 60, attempts: int = 3) -> None:
        """Start the node; when its ports were taken between choosing and binding them (another
        process on the machine picked the same free port), choose new ones and try again."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except _BootFailed:
                if attempt == attempts - 1:
                    raise
                self.port = _free_port(OWN_BROKER_HOST)
                self.url = f"amqp://guest:guest@{OWN_BROKER_HOST}:{self.port}/%2F"
                self.env.update(RABBITMQ_NODE_PORT=str(self.port),
                                RABBITMQ_DIST_PORT=str(_free_port("")))

    def _start(self, timeout: float) -> None:
        import time

        (self.folder / "enabled_plugins").write_text("[].\n")
        out = open(self.folder / "server.out", "wb")
        self.process = subprocess.Popen([f"{RABBITMQ_BIN}/rabbitmq-server"], env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                self.ctl("await_startup", "--timeout", "5", timeout=15)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(0.5)
        tail = (self.folder / "server.out").read_text(errors="replace")[-2000:]
        exited = self.process.poll() is not None
        self.stop()
        raise (_BootFailed if exited else RuntimeError)(
            f"the test's RabbitMQ node {self.node} did not start:\n{tail}")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "30")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.ctl("stop", timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()  # the one process this test started
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory):
    """A RabbitMQ node this module owns and may stop (skips when rabbitmq-server is absent)."""
    if not os.path.exists(f"{RABBITMQ_BIN}/rabbitmq-server"):
        pytest.skip("Debian's rabbitmq-server is not installed (scripts/rabbitmq installs it): "
                    "no broker of the test's own to stop")
    broker = OwnBroker(tmp_path_factory.mktemp("rabbitmq"))
    broker.start()
    yield broker
    broker.stop()
