"""Evaluate a model bundle on labeled texts: every voter and the ensemble, through the services' own code.

`decide_all` runs the voters and the arbiter policy exactly as the services do (minus the bus),
including the cascade: texts the policy escalates are scored by the cascade voters (the LLM) and
decided again. `evaluate` adds what the issue asks to see next to the headline metrics: quality per
subset of voters (what the stacker does when voters are missing) and what the consensus fast path costs.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flockwatch.arbiter.app import load_policy
from flockwatch.arbiter.combiner import CONSENSUS
from flockwatch.arbiter.model import ArbiterPolicy, DecideItem, Escalation
from flockwatch.classical_voter.app import load_core as load_classical
from flockwatch.common.artifacts import read_manifest, verified_file
from flockwatch.common.datasets import Dataset
from flockwatch.common.events import Decision, TextSubmitted
from flockwatch.common.labels import LabelConfig
from flockwatch.common.service import VoterCore
from flockwatch.common.slices import SliceConfig
from flockwatch.common.voting import Opinion, opinions_matrix, to_vote
from flockwatch.regex_voter.app import load_core as load_regex
from flockwatch.trainer.report import EvalInputs, compute_metrics, write_report
from sklearn.metrics import accuracy_score, f1_score

Mode = Literal["cascade", "always", "never"]
Progress = Callable[[str], None]


def load_cores(model_dir: Path) -> list[VoterCore]:
    """Every voter core the bundle configures."""
    loaders = [load_regex, load_classical, *_optional_loaders()]
    return [core for load in loaders if (core := load(model_dir)) is not None]


def _optional_loaders() -> list[Callable[[Path], VoterCore | None]]:
    from flockwatch.classical_voter.embedding_app import load_core as load_embedding
    from flockwatch.llm_voter.app import load_core as load_llm
    from flockwatch.ws_voter.app import load_core as load_ws

    return [load_embedding, load_ws, load_llm]


@dataclass
class Run:
    """What `decide_all` saw: decisions, each voter's opinions (None: not asked), rounds asked, CPU cost."""

    decisions: list[Decision]
    opinions: dict[str, list[Opinion | None]]
    rounds: np.ndarray  # cascade tiers asked per text
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per voter core: CPU-ms per text it scored
    cpu_ms_total: float = 0.0  # voters and arbiter together, per text of the run

    def cascade_report(self, tiers: Sequence[Sequence[str]]) -> dict[str, Any]:
        """Share of texts reaching each round, the voters' measured costs, and CPU-ms per text overall."""
        n = max(len(self.rounds), 1)
        return {
            "rounds": [
                {"tier": r, "voters": list(voters), "reach": float((self.rounds >= r).sum() / n)}
                for r, voters in enumerate([["(every text)"], *tiers])
            ],
            "voter_cpu_ms_per_text": dict(self.cpu_ms),
            "cpu_ms_per_text": self.cpu_ms_total,
        }


def _predict(
    cores: Sequence[VoterCore], texts: Sequence[str], batch: int, cpu: dict[str, float]
) -> dict[str, list[Opinion | None]]:
    """Every core's opinions in batches; adds each core's CPU seconds to `cpu` (keyed by its voters)."""
    out: dict[str, list[Opinion | None]] = {}
    for core in cores:
        start = time.process_time()
        for at in range(0, len(texts), batch):
            for voter, column in core.predict(texts[at : at + batch]).items():
                out.setdefault(voter, []).extend(column)
        key = "+".join(core.voters)
        cpu[key] = cpu.get(key, 0.0) + time.process_time() - start
    return out


def decide_all(
    model_dir: Path,
    texts: list[str],
    mode: Mode = "cascade",
    batch: int = 256,
    policy: ArbiterPolicy | None = None,
    cores: list[VoterCore] | None = None,
) -> Run:
    """Decide every text as the running system would: round by round through the cascade's tiers.

    `always`/`never` ask every tier for all texts / for none. CPU time is process time (all threads). `cores`:
    the bundle's voter cores when the caller already loaded them (`load_cores(model_dir)`).
    """
    cores = cores if cores is not None else load_cores(model_dir)
    policy = policy if policy is not None else load_policy(model_dir)
    tier_of = {v: r for r, voters in enumerate(policy.tiers, start=1) for v in voters}
    by_round = [
        [c for c in cores if max(tier_of.get(v, 0) for v in c.voters) == r] for r in range(len(policy.tiers) + 1)
    ]
    versions = {voter: core.version for core in cores for voter in core.voters}
    n = len(texts)
    cpu: dict[str, float] = {}
    scored: dict[str, int] = {}
    started = time.process_time()
    opinions = _predict(by_round[0], texts, batch, cpu)
    rounds = np.zeros(n, dtype=np.int64)
    for r, tier_cores in enumerate(by_round[1:], start=1):
        if mode == "never" or not tier_cores:
            break
        rows = np.flatnonzero(rounds == r - 1)
        if mode == "cascade":
            outcomes = policy.decide_many(_items(texts, opinions, versions, rows, rounds, True))
            rows = np.array([i for i, o in zip(rows, outcomes, strict=True) if isinstance(o, Escalation)], dtype=int)
        if not len(rows):
            break
        for voter, column in _predict(tier_cores, [texts[i] for i in rows], batch, cpu).items():
            full: list[Opinion | None] = opinions.get(voter) or [None] * n
            for i, op in zip(rows, column, strict=True):
                full[i] = op
            opinions[voter] = full
        for core in tier_cores:
            scored["+".join(core.voters)] = len(rows)
        rounds[rows] = r
    decisions = policy.decide_many(_items(texts, opinions, versions, range(n), rounds, False))
    total_ms = (time.process_time() - started) * 1000 / max(n, 1)
    per_text = {k: 1000 * sec / max(scored.get(k, n), 1) for k, sec in cpu.items()}
    return Run([d for d in decisions if isinstance(d, Decision)], opinions, rounds, per_text, total_ms)


def _items(
    texts: list[str],
    opinions: dict[str, list[Opinion | None]],
    versions: dict[str, str],
    rows: Sequence[int] | np.ndarray,
    rounds: np.ndarray,
    may_escalate: bool,
) -> list[DecideItem]:
    items = []
    for i in rows:
        msg = TextSubmitted(message_id=f"eval:{i}", text_id=f"eval-{i}", text=texts[i])
        votes = [
            to_vote(msg, voter, versions[voter], op, 0.0)
            for voter, column in opinions.items()
            if (op := column[i]) is not None
        ]
        items.append(DecideItem(msg.text_id, votes, texts[i], may_escalate=may_escalate, rounds=int(rounds[i])))
    return items


def collect(
    model_dir: Path,
    data: Dataset,
    mode: Mode = "cascade",
    slices: Path | None = None,
    policy: ArbiterPolicy | None = None,
) -> EvalInputs:
    """Run the bundle on `data` and gather what the report needs."""
    labels = LabelConfig.load(verified_file(model_dir, "labels.yaml"))
    classes = labels.names
    unknown = sorted(set(data.labels) - set(classes))
    if unknown:
        raise ValueError(f"the data has labels the model does not know: {unknown}")
    policy = policy if policy is not None else load_policy(model_dir)
    run = decide_all(model_dir, data.texts, mode, policy=policy)
    voters = {v: opinions_matrix(col, classes) for v, col in run.opinions.items()}
    ens = np.array([[d.probabilities.get(c, np.nan) for c in classes] for d in run.decisions])
    slice_config = _slice_config(model_dir, slices)
    return EvalInputs(
        classes=classes,
        y_true=list(data.labels),
        voters=voters,
        ensemble=ens,
        answered=np.array([not d.abstain for d in run.decisions]),
        prediction_sets=[list(d.prediction_set) for d in run.decisions],
        paths=[d.path for d in run.decisions],
        voters_used=[[v.voter for v in d.votes if not v.abstain] for d in run.decisions],
        llm_called=np.array([op is not None for op in run.opinions.get("llm", [None] * len(data))], dtype=bool),
        cascade=run.cascade_report(policy.tiers),
        slices=slice_config.members(data.texts) if slice_config else {},
        risk_target=policy.config.risk.target,
        set_level=1 - policy.config.alpha,
        baselines={"mean_of_voters": _mean_of_voters(voters)},
        abstain_reasons=[d.abstain_reason for d in run.decisions],
    )


def _slice_config(model_dir: Path, slices: Path | None) -> SliceConfig | None:
    if slices is not None:
        return SliceConfig.load(slices)
    if "slices.yaml" in read_manifest(model_dir, verify=False).files:
        return SliceConfig.load(verified_file(model_dir, "slices.yaml"))
    return None


def _mean_of_voters(voters: dict[str, np.ndarray]) -> np.ndarray:
    """The naive ensemble the stacker replaces: the mean of the voters that gave an opinion."""
    stack = np.stack(list(voters.values()))
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(stack, axis=0)
    return mean / np.nansum(mean, axis=1, keepdims=True)


def stacker_analysis(policy: ArbiterPolicy, inputs: EvalInputs) -> dict[str, Any]:
    """Macro-F1 and accuracy of the forced answer for every subset of voters, and the consensus path's cost."""
    y = np.array([inputs.classes.index(c) for c in inputs.y_true])
    voters = [v for v in policy.stacker.voters_ if v in inputs.voters]
    subsets: dict[str, Any] = {}
    for size in range(1, len(voters) + 1):
        for subset in itertools.combinations(voters, size):
            combined = policy.combine_arrays({v: inputs.voters[v] for v in subset}, consensus=False)
            voted = ~np.isnan(combined.probabilities).any(axis=1)
            pred = np.nan_to_num(combined.probabilities).argmax(axis=1)
            subsets["+".join(subset)] = {
                "n": int(voted.sum()),
                "macro_f1": float(f1_score(y[voted], pred[voted], average="macro")) if voted.any() else None,
                "accuracy": float(accuracy_score(y[voted], pred[voted])) if voted.any() else None,
            }
    all_votes = {v: inputs.voters[v] for v in voters}
    fast = policy.combine_arrays(all_votes, consensus=True)
    slow = policy.combine_arrays(all_votes, consensus=False)
    on = fast.path == CONSENSUS

    def acc(p: np.ndarray) -> float | None:
        return float((np.nan_to_num(p[on]).argmax(axis=1) == y[on]).mean()) if on.any() else None

    return {
        "subsets": subsets,
        "consensus": {
            "rate": float(on.mean()) if len(on) else 0.0,
            "accuracy_fast_path": acc(fast.probabilities),
            "accuracy_stacker_on_same_texts": acc(slow.probabilities),
        },
    }


def evaluate(
    model_dir: Path,
    data: Dataset,
    out: Path | None = None,
    slices: Path | None = None,
    mode: Mode = "cascade",
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    """metrics.json content (and, with `out`, the report and its plots)."""
    progress("voters and arbiter on every text")
    policy = load_policy(model_dir)
    inputs = collect(model_dir, data, mode, slices, policy)
    metrics = write_report(inputs, out, progress) if out is not None else compute_metrics(inputs)
    progress("stacker per voter subset; consensus cost")
    metrics["stacker"] = stacker_analysis(policy, inputs)
    metrics["mode"] = mode
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics
