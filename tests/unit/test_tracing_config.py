"""Which span exporter FLOCKWATCH_TRACING picks, and that off stays off."""

from __future__ import annotations

import pytest
from flockwatch.common import tracing
from flockwatch.common.settings import CommonSettings
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter


def settings(**values: object) -> CommonSettings:
    return CommonSettings(_env_file=None, **values)


def test_tracing_is_off_by_default_and_configure_leaves_it_off() -> None:
    assert settings().tracing == "off" and tracing.exporter_for(settings()) is None
    tracing.configure(settings(), "flockwatch-test")
    assert tracing.ENABLED is False


def test_console_exporter_for_development() -> None:
    assert isinstance(tracing.exporter_for(settings(tracing="console")), ConsoleSpanExporter)


@pytest.mark.parametrize("endpoint", ["http://jaeger:4318", "http://jaeger:4318/", "http://jaeger:4318/v1/traces"])
def test_otlp_exporter_posts_to_the_collectors_traces_path(endpoint: str) -> None:
    exporter = tracing.exporter_for(settings(tracing="otlp", otlp_endpoint=endpoint))
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "http://jaeger:4318/v1/traces"  # noqa: SLF001 - what it will POST to


def test_unknown_exporters_and_ratios_are_refused() -> None:
    with pytest.raises(ValueError, match="tracing"):
        settings(tracing="zipkin")
    with pytest.raises(ValueError, match="tracing_sample_ratio"):
        settings(tracing_sample_ratio=1.5)
