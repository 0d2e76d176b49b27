"""The weak-supervision voter's core: LF registry, label matrix, minimum evidence, method choice, round trip."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from flockwatch.common.artifacts import ArtifactError, Manifest, write_manifest
from flockwatch.common.labels import LabelConfig
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.regex_voter.rules import RuleSet
from flockwatch.ws_voter.app import load_core, save
from flockwatch.ws_voter.lfs import KeywordSpec, LFFile, VoterSpec, build_lfs, load_lfs
from flockwatch.ws_voter.model import (
    LABEL_MODEL,
    MAJORITY,
    TIE,
    MissingVoterOutputs,
    WSModel,
    agreement_accuracy,
    lf_summary,
)

LABELS = LabelConfig.from_names("toy", ["ham", "spam"])
RULES = RuleSet.model_validate(
    {
        "defaults": {"flags": ["IGNORECASE"]},
        "rules": [
            {"id": "prize", "label": "spam", "patterns": ["prize", "winner"]},
            {"id": "call-now", "label": "spam", "patterns": ["call", "now"], "match": "all"},
            {"id": "review-only", "patterns": ["police"], "safety": {"review": True}},
        ],
    }
)
SPEC = LFFile(
    lfs=[
        KeywordSpec(id="kw-ham", label="ham", keywords=["see you", "love"], exclude=[r"\d{5}"]),
        KeywordSpec(id="kw-free", label="spam", patterns=[r"\bFREE\b"], flags=[]),
    ],
    voters=[VoterSpec(voter="clf", min_prob=0.8)],
)
TEXTS = ["You are a WINNER, call now", "see you later, love", "love prize 12345", "free FREE", "nothing here"]
CLF = np.array([[0.1, 0.9], [0.95, 0.05], [np.nan, np.nan], [0.3, 0.7], [0.5, 0.5]])


def toy_texts(n: int = 60) -> tuple[list[str], list[str]]:
    """Spam and ham texts on which the toy LFs are mostly, not always, right."""
    spam = ["win a prize now", "call now for your prize", "FREE entry winner", "winner winner call now"]
    ham = ["see you at home", "love you, see you soon", "call me when you are free", "love the prize you got me"]
    texts = [f"{(spam if i % 2 else ham)[i % 4]} #{i}" for i in range(n)]
    return texts, ["spam" if i % 2 else "ham" for i in range(n)]


def test_label_matrix_has_one_column_per_labeled_rule_keyword_and_voter_lf() -> None:
    lfs = build_lfs(LABELS, RULES, SPEC)
    model = WSModel(LABELS.names, lfs)
    assert lfs.ids == ["regex:prize", "regex:call-now", "kw-ham", "kw-free", "voter:clf>=0.8"]
    L = model.label_matrix(TEXTS, {"clf": CLF})
    assert L.tolist() == [
        [1, 1, -1, -1, 1],  # both rules, and the voter at 0.9
        [-1, -1, 0, -1, 0],
        [1, -1, -1, -1, -1],  # kw-ham excluded by the number; the voter abstained (NaN row)
        [-1, -1, -1, 1, -1],  # FREE is case-sensitive; the voter's 0.7 is below min_prob
        [-1, -1, -1, -1, -1],
    ]


def test_voter_lfs_refuse_missing_or_misshaped_outputs() -> None:
    model = WSModel(LABELS.names, build_lfs(LABELS, RULES, SPEC))
    with pytest.raises(MissingVoterOutputs, match="clf"):
        model.label_matrix(TEXTS, None)
    with pytest.raises(MissingVoterOutputs, match="shape"):
        model.label_matrix(TEXTS, {"clf": CLF[:2]})


def test_abstains_with_a_reason_when_fewer_than_min_lfs_fire() -> None:
    texts, y = toy_texts()
    lfs = build_lfs(LABELS, RULES, SPEC.model_copy(update={"voters": [], "min_lfs": 2}))
    model = WSModel.fit(texts, LABELS, lfs, y=y)
    one, two, none = model.predict(["a prize", "winner, call now", "nothing"])["ws"]
    assert one.abstains and one.abstain_reason == "1 labeling function(s) fired; at least 2 needed"
    assert one.evidence == ("regex:prize",)
    assert none.abstains and none.evidence == ()
    assert two.probabilities is not None and list(two.probabilities) == ["ham", "spam"]
    assert abs(sum(two.probabilities.values()) - 1) < 1e-9 and two.probabilities["spam"] > 0.5


def test_choice_between_label_model_and_majority_follows_the_reported_numbers() -> None:
    texts, y = toy_texts()
    lfs = build_lfs(LABELS, RULES, SPEC.model_copy(update={"voters": []}))
    model = WSModel.fit(texts, LABELS, lfs, y=y)
    report = model.report_
    lm, mv = report[LABEL_MODEL], report[MAJORITY]
    if abs(lm["macro_f1"] - mv["macro_f1"]) >= TIE:
        expected = LABEL_MODEL if lm["macro_f1"] > mv["macro_f1"] else MAJORITY
    else:
        expected = MAJORITY if mv["brier"] < lm["brier"] else LABEL_MODEL
    assert model.method_ == report["chosen"] == expected
    assert WSModel.fit(texts, LABELS, lfs).method_ == LABEL_MODEL  # no labels: nothing to compare
    forced = build_lfs(LABELS, RULES, SPEC.model_copy(update={"voters": [], "model": "majority"}))
    assert WSModel.fit(texts, LABELS, forced, y=y).report_["reason"] == "given in lfs.yaml"


def test_majority_confidence_comes_from_how_often_lfs_agree() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 4000)
    wrong = (y[:, None] + rng.integers(1, 3, (4000, 5))) % 3  # errors spread evenly over the other classes
    L = np.where(rng.random((4000, 5)) < 0.8, y[:, None], wrong)
    L[rng.random((4000, 5)) < 0.3] = -1
    assert agreement_accuracy(L, 3) == pytest.approx(0.8, abs=0.02)


def test_lf_summary_matches_snorkel_lf_analysis() -> None:
    from snorkel.labeling import LFAnalysis

    rng = np.random.default_rng(1)
    L = rng.integers(-1, 3, (200, 4))
    y = rng.integers(0, 3, 200)
    ours = lf_summary(L, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scipy sparse API inside LFAnalysis
        theirs = LFAnalysis(L).lf_summary(y)
    for row, (_, expected) in zip(ours, theirs.iterrows(), strict=True):
        assert row["coverage"] == pytest.approx(expected["Coverage"])
        assert row["overlaps"] == pytest.approx(expected["Overlaps"])
        assert row["conflicts"] == pytest.approx(expected["Conflicts"])
        assert row["accuracy"] == pytest.approx(expected["Emp. Acc."])


@pytest.mark.parametrize("method", [LABEL_MODEL, "majority"])
def test_save_and_load_round_trip_through_a_verified_bundle(tmp_path: Path, method: str) -> None:
    """Written as skops (no pickle), the model predicts as it did: the label model's own `predict_proba` too."""
    texts, y = toy_texts()
    lfs = build_lfs(LABELS, RULES, SPEC.model_copy(update={"voters": [], "model": method}))
    model = WSModel.fit(texts, LABELS, lfs, y=y)
    assert model.method_ == method and model.label_model_ is not None
    assert save(model, tmp_path) == ["ws.skops", "ws_lfs.yaml"]
    write_manifest(tmp_path, Manifest(name="toy", version="v1", components={"ws": "ws-v1"}))
    loaded = load_core(tmp_path)
    assert isinstance(loaded, WSModel) and loaded.version == "ws-v1"
    assert loaded.predict(texts) == model.predict(texts)
    L = model.label_matrix(texts, None)
    assert loaded.label_model_ is not None
    np.testing.assert_array_equal(loaded.label_model_.predict_proba(L), model.label_model_.predict_proba(L))
    assert [lf.patterns for lf in loaded.lfs.patterns] == [lf.patterns for lf in lfs.patterns]
    (tmp_path / "ws.skops").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="ws.skops"):
        load_core(tmp_path)


def test_a_bundle_without_a_ws_model_gives_no_core(tmp_path: Path) -> None:
    (tmp_path / "labels.yaml").write_text("task: toy\nlabels: [{name: a}, {name: b}]\n")
    write_manifest(tmp_path, Manifest(name="toy", version="v1"))
    assert load_core(tmp_path) is None


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("lfs:\n  - id: a\n    keywords: [x]\n    label: eggs\n", 4, "unknown label 'eggs'"),
        ("lfs:\n  - id: a\n    label: ham\n    patterns: ['x', '(']\n", 4, "invalid regex"),
        ("min_lfs: 1\nlfs:\n  - id: a\n    label: ham\n", 3, "needs keywords or patterns"),
        ("voters:\n  - voter: clf\n    min_prob: 2\n", 3, "less than or equal to 1"),
    ],
)
def test_bad_lfs_yaml_names_file_line_and_field(tmp_path: Path, body: str, line: int, message: str) -> None:
    path = tmp_path / "lfs.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as err:
        load_lfs(LABELS, None, path)
    assert f"{path}:{line}:" in str(err.value)


def test_no_labeling_functions_at_all_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no labeling functions"):
        build_lfs(LABELS, None, None)


def test_lf_report_prints_each_lf_and_the_comparison(tmp_path: Path) -> None:
    from flockwatch.ws_voter.cli import lf_app
    from typer.testing import CliRunner

    texts, y = toy_texts()
    (tmp_path / "data.csv").write_text("text,label\n" + "".join(f'"{t}",{v}\n' for t, v in zip(texts, y, strict=True)))
    (tmp_path / "labels.yaml").write_text("task: toy\nlabels: [{name: ham}, {name: spam}]\n")
    (tmp_path / "lfs.yaml").write_text(
        "lfs:\n  - {id: kw-prize, label: spam, keywords: [prize, winner]}\n"
        "  - {id: kw-now, label: spam, keywords: [now]}\n  - {id: kw-love, label: ham, keywords: [love, see you]}\n"
    )
    args = ["report", "--data", str(tmp_path / "data.csv"), "--labels", str(tmp_path / "labels.yaml")]
    result = CliRunner().invoke(lf_app, [*args, "--lfs", str(tmp_path / "lfs.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "kw-prize" in result.output and "emp. acc." in result.output and "(chosen)" in result.output
    missing = CliRunner().invoke(lf_app, args)
    assert missing.exit_code == 2 and "give --rules and/or --lfs" in missing.output


@pytest.mark.parametrize("k", [2, 4])
def test_the_label_models_posterior_without_snorkels_set_up_is_bit_identical(k: int) -> None:
    """`fastpath.Posterior` against snorkel's own `predict_proba`, on random label matrices (abstains, rows no
    LF covers, one row, many rows), for a model fitted on them; and the ws model uses it."""
    from flockwatch.ws_voter.fastpath import Posterior
    from snorkel.labeling.model import LabelModel

    rng = np.random.default_rng(k)
    m = 7
    truth = rng.integers(0, k, 600)
    L_train = np.where(rng.random((600, m)) < 0.6, np.where(rng.random((600, m)) < 0.8, truth[:, None], -1), -1)
    lm = LabelModel(cardinality=k, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.fit(L_train, n_epochs=50, seed=1)
        fast = Posterior(lm)
        for n in (1, 2, 37, 600):
            L = rng.integers(-1, k, (n, m))
            L[0] = -1  # a row no LF covers
            assert fast.fits(lm, L)
            np.testing.assert_array_equal(fast.predict_proba(L), lm.predict_proba(L))
    assert not fast.fits(lm, np.zeros((3, m + 1), dtype=np.int64))  # another width: snorkel answers
    assert not fast.fits(LabelModel(cardinality=k, verbose=False), L_train)  # another model object


def test_the_ws_model_scores_through_the_fast_posterior_and_pickles_without_it() -> None:
    import pickle

    texts, _ = toy_texts()
    model = WSModel.fit(texts, LABELS, build_lfs(LABELS, RULES, SPEC.model_copy(update={"voters": []})))
    assert model.label_model_ is not None  # no labels: the label model is chosen
    L = model.label_matrix(texts, None)
    p = model.proba(L, LABEL_MODEL)
    assert model._fast is not None and model._fast.source is model.label_model_
    again = pickle.loads(pickle.dumps(model))
    assert not hasattr(again, "_fast")
    np.testing.assert_array_equal(again.proba(L, LABEL_MODEL), p)
