"""Kafka authentication: the settings (SASL mechanism, user, password, TLS) become the client's security
configuration, which the bus hands to every Kafka client it builds; bad combinations are refused at start.

Not run end to end here: the dev broker (Tansu 0.6) offers SCRAM only and cannot add a user while it requires
authentication, and Apache Kafka needs Docker. The mapping below goes through FastStream's own parser
(`parse_security`), which is what its broker calls to build the aiokafka producer and consumers."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from faststream.kafka.security import parse_security
from flockwatch.common import bus_faststream, kafka_config
from flockwatch.common.settings import CommonSettings
from pydantic import ValidationError

KAFKA = "kafka://kafka:9092"


def settings(**fields: Any) -> CommonSettings:
    return CommonSettings(_env_file=None, bus_url=KAFKA, **fields)


def client_options(**fields: Any) -> dict[str, Any]:
    """What aiokafka is given for these settings."""
    return dict(parse_security(kafka_config.security(settings(**fields))))


def test_no_mechanism_no_tls_is_plaintext() -> None:
    assert kafka_config.security(settings()) is None
    assert client_options() == {}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_in_the_clear_or_over_tls(mechanism: str) -> None:
    clear = client_options(kafka_sasl_mechanism=mechanism, kafka_username="flockwatch", kafka_password="s3cret")
    assert clear == {
        "security_protocol": "SASL_PLAINTEXT",
        "ssl_context": None,
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "flockwatch",
        "sasl_plain_password": "s3cret",
    }
    tls = client_options(
        kafka_sasl_mechanism=mechanism, kafka_username="flockwatch", kafka_password="s3cret", kafka_tls=True
    )
    assert tls["security_protocol"] == "SASL_SSL" and tls["sasl_mechanism"] == mechanism
    context = tls["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname  # the broker's certificate checked


def test_tls_without_sasl_and_a_ca_file(tmp_path: Any) -> None:
    options = client_options(kafka_tls=True)
    assert options["security_protocol"] == "SSL" and isinstance(options["ssl_context"], ssl.SSLContext)
    missing = tmp_path / "ca.pem"
    with pytest.raises(FileNotFoundError):  # a CA file that is not there fails at start, not at the first publish
        kafka_config.security(settings(kafka_tls=True, kafka_ca_file=missing))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kafka_sasl_mechanism": "PLAIN"}, "needs kafka_username and kafka_password"),
        ({"kafka_sasl_mechanism": "PLAIN", "kafka_username": "u"}, "needs kafka_username and kafka_password"),
        ({"kafka_username": "u", "kafka_password": "p"}, "without kafka_sasl_mechanism"),
        ({"kafka_ca_file": "/etc/ssl/ca.pem"}, "set kafka_tls=true too"),
        ({"kafka_sasl_mechanism": "GSSAPI", "kafka_username": "u", "kafka_password": "p"}, "PLAIN"),
    ],
)
def test_incomplete_or_unknown_settings_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(**fields)


def test_the_password_is_not_shown_with_the_settings() -> None:
    secret = settings(kafka_sasl_mechanism="PLAIN", kafka_username="u", kafka_password="s3cret")
    assert "s3cret" not in repr(secret) and "s3cret" not in str(secret.model_dump())


def test_the_bus_hands_the_security_to_its_kafka_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    given: dict[str, Any] = {}

    class Recorder:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            given.update(kwargs)

    monkeypatch.setattr(bus_faststream, "KafkaBroker", Recorder)
    bus_faststream.FastStreamBus(
        settings(kafka_sasl_mechanism="SCRAM-SHA-512", kafka_username="flockwatch", kafka_password="s3cret")
    )
    assert parse_security(given["security"])["sasl_mechanism"] == "SCRAM-SHA-512"
