"""Must-catch cases (`make test-safety`): the shipped SMS cases on a trained bundle, a miss failing the CLI,
and the trainer's gate rejecting a challenger whose bundle answers one of its cases wrongly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from flockwatch.cli.main import app
from flockwatch.common.artifacts import read_manifest, write_manifest
from flockwatch.common.datasets import Dataset
from flockwatch.trainer.data import HeldOutSet
from flockwatch.trainer.gate import GateConfig
from flockwatch.trainer.job import gate_candidate
from flockwatch.trainer.safety import MUST_CATCH, bundle_cases, check_must_catch, load_cases
from typer.testing import CliRunner

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "sms" / "must_catch.csv"
OBVIOUS_SPAM = "WINNER!! You have won a £1000 cash prize! To claim call 09061701461 now. 150p/min, 18+ only"


def test_the_shipped_cases_are_caught(sms_bundle: Path) -> None:
    cases = load_cases(SHIPPED)
    result = check_must_catch(sms_bundle, cases)
    assert result.passed, result.missed
    assert result.n == len(cases) >= 10 and result.caught >= 0.8 * result.n


def test_a_miss_fails_the_command(sms_bundle: Path, tmp_path: Path) -> None:
    cases = tmp_path / "cases.csv"
    pd.DataFrame({"text": [OBVIOUS_SPAM], "label": ["ham"]}).to_csv(cases, index=False)  # a wrong "must" label
    runner = CliRunner()
    missed = runner.invoke(app, ["safety", "--models", str(sms_bundle), "--cases", str(cases)])
    assert missed.exit_code == 1 and "1 missed" in missed.output and "ham → spam" in missed.output
    caught = runner.invoke(app, ["safety", "--models", str(sms_bundle), "--cases", str(SHIPPED)])
    assert caught.exit_code == 0 and "0 missed" in caught.output
    no_cases = runner.invoke(app, ["safety", "--models", str(sms_bundle)])
    assert no_cases.exit_code == 2 and "no must-catch cases" in no_cases.output


def test_the_gate_rejects_a_challenger_that_misses_a_case(sms_bundle: Path, tmp_path: Path) -> None:
    texts = ["see you at 5 then", "ok lor", OBVIOUS_SPAM, "Free entry! Text WIN to 87121"]
    held = Dataset(texts, ["ham"] * 2 + ["spam"] * 2)
    held_out = HeldOutSet(held, np.ones(len(held), dtype=bool), 0)
    config = GateConfig(n_boot=200)

    def candidate(name: str, label: str) -> Path:
        bundle = tmp_path / name
        shutil.copytree(sms_bundle, bundle)
        pd.DataFrame({"text": [OBVIOUS_SPAM], "label": [label]}).to_csv(bundle / MUST_CATCH, index=False)
        write_manifest(bundle, read_manifest(bundle, verify=False))  # re-hashed: the case file is part of it
        assert bundle_cases(bundle) is not None
        return bundle

    good = gate_candidate(candidate("good", "spam"), None, held_out, "full", config)
    bad = gate_candidate(candidate("bad", "ham"), None, held_out, "full", config)
    assert "must_catch" not in good.reasons and {c.name for c in good.checks} >= {"must_catch"}
    assert not bad.passed and "must_catch" in bad.reasons
    (check,) = [c for c in bad.checks if c.name == "must_catch"]
    assert check.detail["missed"][0]["prediction"] == "spam"
