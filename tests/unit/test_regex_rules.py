"""The rules file: validation with file/line/rule in errors, bundled configs, and `rules test`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flockwatch.common.labels import LabelConfig
from flockwatch.common.slices import SliceConfig
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.regex_voter.cli import rules_app
from flockwatch.regex_voter.rules import RuleSet, load_rules
from typer.testing import CliRunner

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LABELS = LabelConfig.from_names("t", ["ham", "spam"])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: prize\n    label: spam\n    patterns: ['prize']\n")
    assert load_rules(path, LABELS).rules[0].id == "prize"


def test_invalid_regex_error_names_rule_and_line(tmp_path: Path) -> None:
    text = "rules:\n  - id: ok\n    label: ham\n    patterns: [fine]\n  - id: broken\n    label: spam\n"
    path = write(tmp_path, text + "    patterns:\n      - good\n      - '(unclosed'\n")
    with pytest.raises(ConfigError) as err:
        load_rules(path, LABELS)
    assert "rule 'broken' (line 9)" in str(err.value)
    assert str(path) in str(err.value)


def test_invalid_exclusion_regex_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    label: spam\n    patterns: [a]\n    exclude: ['[z']\n")
    with pytest.raises(ConfigError, match=r"rule 'r' \(line 5\): exclude\[0\]"):
        load_rules(path, LABELS)


def test_duplicate_rule_ids_are_rejected(tmp_path: Path) -> None:
    rule = "  - id: twice\n    label: spam\n    patterns: [a]\n"
    path = write(tmp_path, "rules:\n" + rule + rule)
    with pytest.raises(ConfigError, match=r"rule 'twice' \(line 5\): duplicate id"):
        load_rules(path, LABELS)


def test_unknown_label_error_names_rule_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    patterns: [a]\n    label: eggs\n")
    with pytest.raises(ConfigError) as err:
        load_rules(path, LABELS)
    assert f"{path}:4: rules.0.label: rule 'r': unknown label 'eggs'" in str(err.value)


def test_unknown_safety_label_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    patterns: [a]\n    safety:\n      min_label: eggs\n")
    with pytest.raises(ConfigError, match=r":5: rules\.0\.safety\.min_label: rule 'r': unknown label"):
        load_rules(path, LABELS)


def test_rule_without_label_or_safety_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: mute\n    patterns: [a]\n")
    with pytest.raises(ConfigError, match="rule 'mute' needs a label, a safety trigger or both"):
        load_rules(path, LABELS)


def test_safety_that_demands_nothing_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    label: spam\n    patterns: [a]\n    safety: {review: false}\n")
    with pytest.raises(ConfigError, match="safety needs min_label or review"):
        load_rules(path, LABELS)


def test_unknown_field_error_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    label: spam\n    patterns: [a]\n    priorty: 3\n")
    with pytest.raises(ConfigError, match=r":5: rules\.0\.priorty"):
        load_rules(path, LABELS)


def test_rule_id_with_spaces_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: two words\n    label: spam\n    patterns: [a]\n")
    with pytest.raises(ConfigError, match=r":2: rules\.0\.id"):
        load_rules(path, LABELS)


def test_unknown_flag_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    label: spam\n    patterns: [a]\n    flags: [UNICORN]\n")
    with pytest.raises(ConfigError, match=r"rules\.0\.flags\.0"):
        load_rules(path, LABELS)


def test_confidence_not_above_chance_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    label: spam\n    confidence: 0.5\n    patterns: [a]\n")
    with pytest.raises(ConfigError, match=r":4: rules\.0\.confidence: rule 'r': confidence must be above 1/2"):
        load_rules(path, LABELS)


def test_empty_patterns_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    label: spam\n    patterns: []\n")
    with pytest.raises(ConfigError, match=r"rules\.0\.patterns"):
        load_rules(path, LABELS)


def test_rules_inherit_defaults() -> None:
    ruleset = RuleSet.model_validate(
        {
            "defaults": {"flags": ["IGNORECASE"], "confidence": 0.8},
            "rules": [{"id": "r", "label": "spam", "patterns": ["a"]}],
        }
    )
    assert ruleset.flags_for(ruleset.rules[0]) == re.IGNORECASE
    assert ruleset.confidence_for(ruleset.rules[0]) == 0.8


def test_rule_flags_replace_defaults() -> None:
    ruleset = RuleSet.model_validate(
        {"defaults": {"flags": ["IGNORECASE"]}, "rules": [{"id": "r", "label": "spam", "patterns": ["a"], "flags": []}]}
    )
    assert ruleset.flags_for(ruleset.rules[0]) == 0


def test_regexes_are_checked_with_the_default_flags() -> None:
    # valid only in VERBOSE mode, where '#' starts a comment
    rule = {"id": "r", "label": "spam", "patterns": ["a # ( not a group"]}
    RuleSet.model_validate({"defaults": {"flags": ["VERBOSE"]}, "rules": [rule]})
    with pytest.raises(ValueError, match="invalid regex"):
        RuleSet.model_validate({"rules": [rule]})


def test_labels_used_lists_labels_and_safety_floors_in_order() -> None:
    ruleset = RuleSet.model_validate(
        {
            "rules": [
                {"id": "a", "label": "spam", "patterns": ["a"]},
                {"id": "b", "patterns": ["b"], "safety": {"min_label": "risky"}},
                {"id": "c", "label": "ham", "patterns": ["c"], "safety": {"min_label": "spam"}},
            ]
        }
    )
    assert ruleset.labels_used() == ["spam", "risky", "ham"]


@pytest.mark.parametrize("rules_yaml", sorted(CONFIGS.glob("*/rules.yaml")), ids=lambda p: p.parent.name)
def test_bundled_rules_load_with_their_labels(rules_yaml: Path) -> None:
    labels = LabelConfig.load(rules_yaml.parent / "labels.yaml")
    assert load_rules(rules_yaml, labels).rules


def test_birdflu_configs_validate() -> None:
    labels = LabelConfig.load(CONFIGS / "birdflu" / "labels.yaml")
    load_rules(CONFIGS / "birdflu" / "rules.yaml", labels)
    assert SliceConfig.load(CONFIGS / "birdflu" / "slices.yaml").slices
    assert labels.harm("high_risk") > labels.harm("informational")


def test_cli_shows_fired_rules_winner_probabilities_and_safety() -> None:
    args = ["test", str(CONFIGS / "birdflu" / "rules.yaml"), "We buried the dead hens ourselves"]
    result = CliRunner().invoke(rules_app, [*args, "--labels", str(CONFIGS / "birdflu" / "labels.yaml")])
    assert result.exit_code == 0, result.output
    assert "fired handle-sick-birds" in result.output
    assert "on 'dead hens'" in result.output
    assert "winner: handle-sick-birds" in result.output
    assert "high_risk" in result.output and "0.850" in result.output
    assert "safety: handle-sick-birds: at least high_risk" in result.output


def test_cli_without_labels_uses_the_labels_the_rules_name(tmp_path: Path) -> None:
    path = write(
        tmp_path, "rules:\n  - id: a\n    label: x\n    patterns: [a]\n  - id: b\n    label: y\n    patterns: [b]\n"
    )
    result = CliRunner().invoke(rules_app, ["test", str(path), "a"])
    assert result.exit_code == 0, result.output
    assert re.search(r"x\s.*0\.900", result.output) and re.search(r"y\s.*0\.100", result.output)


def test_cli_exits_2_with_the_error_on_an_invalid_file(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: r\n    label: spam\n    patterns: ['(']\n")
    result = CliRunner().invoke(rules_app, ["test", str(path), "text"])
    assert result.exit_code == 2
    assert "rule 'r' (line 4)" in result.output
    assert "Traceback" not in result.output
