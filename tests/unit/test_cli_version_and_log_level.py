"""`flockwatch --version`, and FLOCKWATCH_LOG_LEVEL read (any case) and checked."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from flockwatch.cli.main import app
from flockwatch.common.settings import CommonSettings
from pydantic import ValidationError
from typer.testing import CliRunner


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"flockwatch {version('flockwatch')}"


def test_the_log_level_is_read_in_any_case_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOCKWATCH_LOG_LEVEL", "debug")
    assert CommonSettings(_env_file=None).log_level == "DEBUG"
    monkeypatch.setenv("FLOCKWATCH_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError):
        CommonSettings(_env_file=None)
    served = CliRunner().invoke(app, ["serve", "regex_voter"])  # refused before anything starts
    assert served.exit_code == 2 and "FLOCKWATCH_LOG_LEVEL" in served.output


def test_json_log_lines_carry_the_trace_and_span(capsys: pytest.CaptureFixture[str]) -> None:
    """FLOCKWATCH_LOG_FORMAT=json: one JSON object a line, with the ids of the span it was logged in."""
    import json
    import logging

    from flockwatch.common.logs import configure
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    configure("INFO", "json")
    try:
        with tracer.start_as_current_span("decide") as span:
            logging.getLogger("flockwatch.test").warning("decided %s", "t-1")
        logging.getLogger("flockwatch.test").info("outside")
        logging.getLogger("flockwatch.test").debug("below the level")
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    inside, outside = lines
    context = span.get_span_context()
    assert inside["message"] == "decided t-1" and inside["level"] == "WARNING" and inside["logger"] == "flockwatch.test"
    ids = (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    assert (inside["trace_id"], inside["span_id"]) == ids
    assert outside["trace_id"] == "" and "ts" in outside
