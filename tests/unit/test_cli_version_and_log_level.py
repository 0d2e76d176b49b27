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
