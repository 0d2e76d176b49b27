"""Property tests (hypothesis) for the regex rule DSL: any input either loads or is refused with a ConfigError,
and any valid rule set gives probabilities that sum to 1 with the winning rule's label on top, the same rules
firing in the fast path (merged alternations) as in `explain`."""

from __future__ import annotations

import math
import re
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from flockwatch.common.labels import LabelConfig, LabelSpec
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.regex_voter.model import RuleEngine, rules_version
from flockwatch.regex_voter.rules import RuleSet, load_rules
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLAGS = ["IGNORECASE", "MULTILINE", "DOTALL", "ASCII", "VERBOSE"]
# pieces of Python regexes, including what makes merging `any` patterns into one alternation delicate: groups
# and back-references, named groups, inline flags, anchors, comments (VERBOSE), escapes
ATOMS = [
    "a", "b", "ab", "A", " ", "[ab]", "[^a]", ".", "a+", "b*", "a?", "x{2}", "^", "$", r"\b", r"\d", r"\s",
    "(a)", "(a|b)", "(?:ab)", r"(a)\1", "(?P<g>a)", "(?P<g>b)(?P=g)", "(?i:a)", "(?i)", "(?x)", "(?=a)", "(?!b)",
    "(?<=a)", "#", " # note", r"\#", r"\ ", "\n", "|", "(", ")", "[", "\\",
]  # fmt: skip
LABELS = ["c0", "c1", "c2", "c3"]

# simple patterns often, so that several rules fire on one text (ties, exclusions) as often as odd regexes come
patterns = st.sampled_from(["a", "b", "x", "a|b", ""]) | st.lists(st.sampled_from(ATOMS), min_size=1, max_size=4).map(
    "".join
)
texts = st.text(alphabet="abABx1 #\n", max_size=14)


def compiles(pattern: str, flags: list[str]) -> bool:
    """The pattern compiles with these flags, without a warning (`[[` warns; warnings are errors in tests)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            re.compile(pattern, sum(int(getattr(re, f)) for f in flags))
    except (re.error, FutureWarning, DeprecationWarning):
        return False
    return True


@st.composite
def rule_sets(draw: st.DrawFn) -> tuple[dict[str, Any], LabelConfig]:
    """A valid rules file (as loaded YAML) and the labels it is checked against."""
    names = LABELS[: draw(st.integers(2, 4))]
    low = 1 / len(names) + 0.01  # confidences must put a rule's label on top
    defaults_flags = draw(st.lists(st.sampled_from(FLAGS), unique=True, max_size=2))
    rules = []
    for i in range(draw(st.integers(1, 5))):
        flags = draw(st.none() | st.lists(st.sampled_from(FLAGS), unique=True, max_size=2))
        effective = defaults_flags if flags is None else flags
        valid = patterns.filter(partial(compiles, flags=effective))
        rule: dict[str, Any] = {
            "id": f"r{i}",
            "patterns": draw(st.lists(valid, min_size=1, max_size=3)),
            "match": draw(st.sampled_from(["any", "all"])),
            "exclude": draw(st.lists(valid, max_size=2)),
            "priority": draw(st.integers(0, 1)),
        }
        if flags is not None:
            rule["flags"] = flags
        label = draw(st.none() | st.sampled_from(names))
        safety = draw(st.none() | st.sampled_from([{"review": True}, {"min_label": names[-1]}]))
        if label is None and safety is None:
            label = names[0]
        if label is not None:
            rule["label"] = label
            rule["confidence"] = draw(st.floats(low, low + 0.05) | st.floats(low, 1.0))
        if safety is not None:
            rule["safety"] = safety
        rules.append(rule)
    data = {"defaults": {"flags": defaults_flags, "confidence": 0.95}, "rules": rules}
    return data, LabelConfig(task="t", labels=[LabelSpec(name=n) for n in names])


@SETTINGS
@given(rule_sets(), st.lists(texts, min_size=1, max_size=4))
@example(  # two labels tied at the top priority with low confidences, four classes: found by this test
    (
        {
            "rules": [
                {"id": "r0", "patterns": ["a"], "label": "c0", "confidence": 0.26},
                {"id": "r1", "patterns": ["a"], "label": "c1", "confidence": 0.26},
            ]
        },
        LabelConfig(task="t", labels=[LabelSpec(name=n) for n in LABELS]),
    ),
    ["a"],
)
def test_probabilities_sum_to_one_with_a_fired_top_label_on_top(
    generated: tuple[dict[str, Any], LabelConfig], batch: list[str]
) -> None:
    data, labels = generated
    engine = RuleEngine(RuleSet.model_validate(data), labels)
    for text, opinion in zip(batch, engine.predict(batch), strict=True):
        fired = [t for t in engine.explain(text) if t.fired]
        assert set(opinion.evidence) == {t.rule_id for t in fired}  # the fast path fires the rules explain does
        assert {s.rule_id for s in opinion.safety} == {t.rule_id for t in fired if t.safety is not None}
        labeled = [t for t in fired if t.label is not None]
        if not labeled:
            assert opinion.probabilities is None and opinion.abstain_reason
            continue
        probs = opinion.probabilities
        assert probs is not None and list(probs) == labels.names
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
        assert all(0.0 <= p <= 1.0 for p in probs.values())
        top_priority = max(t.priority for t in labeled)
        winners = {t.label for t in labeled if t.priority == top_priority}
        best = max(probs.values())
        assert {n for n, p in probs.items() if math.isclose(p, best, abs_tol=1e-12)} <= winners
        assert opinion.evidence[0] in {t.rule_id for t in labeled if t.priority == top_priority}


@SETTINGS
@given(rule_sets(), st.text(max_size=20))
def test_descriptions_and_task_do_not_change_the_rules_version(
    generated: tuple[dict[str, Any], LabelConfig], words: str
) -> None:
    data, _ = generated
    described = {**data, "task": words, "rules": [{**r, "description": words} for r in data["rules"]]}
    assert rules_version(RuleSet.model_validate(described)) == rules_version(RuleSet.model_validate(data))


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
rule_like = st.fixed_dictionaries(
    {},
    optional={
        "id": yaml_values | st.sampled_from(["r", "r-1", "bad id"]),
        "label": yaml_values | st.sampled_from(LABELS),
        "patterns": yaml_values | st.lists(patterns, max_size=2),
        "exclude": yaml_values | st.lists(patterns, max_size=2),
        "match": yaml_values | st.sampled_from(["any", "all"]),
        "flags": yaml_values | st.lists(st.sampled_from([*FLAGS, "LOCALE"]), max_size=2),
        "confidence": yaml_values,
        "priority": yaml_values,
        "safety": yaml_values | st.fixed_dictionaries({}, optional={"min_label": yaml_values, "review": yaml_values}),
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "rules": yaml_values | st.lists(rule_like, max_size=3),
        "defaults": yaml_values | st.fixed_dictionaries({}, optional={"flags": yaml_values, "confidence": yaml_values}),
        "task": yaml_values,
    },
)
LABELS_YAML = "task: t\nlabels:\n  - name: c0\n  - name: c1\n  - name: c2\n"


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # `[[` in a user regex: a warning
@SETTINGS
@given(documents | yaml_values)
def test_any_document_loads_or_is_refused_with_a_config_error(tmp_path_factory: Any, document: Any) -> None:
    path = write(tmp_path_factory, yaml.safe_dump(document, allow_unicode=True))
    assert_loads_or_config_error(path)


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # `[[` in a user regex: a warning
@SETTINGS
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200) | st.binary(max_size=100))
def test_any_file_content_loads_or_is_refused_with_a_config_error(tmp_path_factory: Any, content: str | bytes) -> None:
    assert_loads_or_config_error(write(tmp_path_factory, content))


def write(tmp_path_factory: Any, content: str | bytes) -> Path:
    path: Path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_loads_or_config_error(path: Path) -> None:
    labels = LabelConfig.model_validate(yaml.safe_load(LABELS_YAML))
    try:
        ruleset = load_rules(path, labels)
    except ConfigError as exc:
        assert str(path) in str(exc)  # every refusal names the file
        return
    except ValidationError as exc:  # pragma: no cover - the failure this test looks for
        raise AssertionError(f"a ValidationError escaped instead of a ConfigError: {exc}") from exc
    RuleEngine(ruleset, labels).predict(["a b", ""])  # what loads, runs
