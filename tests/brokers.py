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
        """(URL, password) of a new user of this vhost with a random password (deleted with it)."""
        self.extra_user = f"{self.name}-user"
        password = secrets.token_urlsafe(12)
        rabbitmqctl("add_user", self.extra_user, password)
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
        reply=True, timeout: float = 30.0, user_id: str | None = None):
    """Publish ``body`` as an integrator would (blocking pika; run it in a thread) and return
    (properties, body) of the answer on a private reply queue, or None when ``reply`` is False.
    ``user_id``: the AMQP user_id property (RabbitMQ refuses one that is not the login's)."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        reply_to = None
        if reply:
            reply_to = channel.queue_declare("", exclusive=True).method.queue
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
