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


def test_a_retrain_keeps_the_champions_whole_configuration(sms_bundle: Path, tmp_path: Path) -> None:
    """Labels, rules, keyword LFs, slices, conformal.yaml and must-catch cases all come from the champion
    unless the trainer is told otherwise (a retrain that dropped the keyword LFs once went unnoticed)."""
    import yaml
    from flockwatch.common.labels import LabelConfig
    from flockwatch.trainer.job import JobSpec, full_config
    from flockwatch.ws_voter.lfs import LFFile, load_lf_file

    configs = SHIPPED.parent
    champion = tmp_path / "champion"
    shutil.copytree(sms_bundle, champion)
    shutil.copyfile(SHIPPED, champion / MUST_CATCH)
    write_manifest(champion, read_manifest(champion, verify=False))
    spec = JobSpec(run_id="r1", work_dir=tmp_path, name="sms", champion=champion, base_data=tmp_path / "x.csv")
    config = full_config(spec, Dataset(["a", "b"], ["ham", "spam"]), Dataset(["c"], ["ham"]))
    for key, file in (("labels", "labels.yaml"), ("rules", "rules.yaml"), ("slices", "slices.yaml")):
        path = getattr(config, key)
        assert path is not None and path.read_text() == (configs / file).read_text(), key
    assert config.conformal is not None and "target: 0.03" in config.conformal.read_text()  # the fixture's own
    assert config.must_catch is not None and load_cases(config.must_catch).texts == load_cases(SHIPPED).texts
    labels = LabelConfig.load(configs / "labels.yaml")
    assert config.lfs is not None
    kept, shipped = load_lf_file(config.lfs, labels), load_lf_file(configs / "lfs.yaml", labels)
    assert kept == shipped and len(kept.lfs) >= 5
    told = tmp_path / "lfs.yaml"
    told.write_text(yaml.safe_dump(LFFile(lfs=shipped.lfs[:1]).model_dump(mode="json")))
    spec_told = JobSpec(**{**spec.model_dump(), "configs": {"lfs": told, "rules": None}})
    assert full_config(spec_told, Dataset(["a"], ["ham"]), Dataset(["c"], ["ham"])).lfs == told
