"""Safe rollout: a gated challenger decides live traffic in shadow before it is promoted, and a published
version is watched on the corrections that arrive for its answers, and rolled back when it does worse.

**Shadow.** With `trainer_shadow_texts` > 0, a challenger that passed the offline gate is not published: its
run waits in status `shadow` while the trainer decides, off the serving path, the live texts the champion
decides from then on (the feedback store's texts and decisions; the texts are PII-scrubbed there). Each is
recorded next to the champion's served decision (`shadow_decisions`). Once it has seen that many texts (or
after `trainer_shadow_max_s`, on what it saw) it is judged (`judge_shadow`): promoted, or rejected with the
reason. A newer challenger that passes the gate replaces one still in shadow.

**Watch.** With `trainer_watch_corrections` > 0, once that many corrections have arrived for texts the
published version answered, its error on them is compared with its predecessor's on the corrected texts
it answered (`judge_watch`): a significantly higher error (one-sided Fisher exact test) beyond a margin rolls
the model root back to the predecessor and announces it; the registry history records why.

A canary share (the challenger serving part of live traffic) is not built: the voters and the arbiter
would each hold two bundles and route texts between them.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flockwatch.common import telemetry
from flockwatch.trainer import registry
from scipy.stats import fisher_exact

if TYPE_CHECKING:
    from flockwatch.trainer.app import TrainerService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowRow:
    """One live text: the champion's served decision and the challenger's shadow decision (None: abstained)."""

    champion: str | None
    challenger: str | None
    label: str | None  # the latest clean correction, if any


@dataclass(frozen=True)
class ShadowVerdict:
    """What the shadow phase measured, and whether the challenger may be promoted."""

    passed: bool
    reasons: list[str]
    n: int
    agreement: float | None  # share of texts both answered on which they agree
    champion_coverage: float
    challenger_coverage: float
    corrected: int  # shadow texts with a correction
    champion_wrong: int  # answered, and the correction says otherwise
    challenger_wrong: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def judge_shadow(rows: list[ShadowRow], min_agreement: float, coverage_margin: float) -> ShadowVerdict:
    """Promote unless, on the live texts:
    - the challenger answers a smaller share than the champion by more than `coverage_margin`;
    - the corrections that arrived say it answered wrongly more often than the champion did;
    - it agrees with the champion on less than `min_agreement` of the texts both answered, and the
      corrections do not take its side (the champion not wrong more often than it).
    No live text: promoted on the offline gate alone (recorded as such)."""
    n = len(rows)
    both = [r for r in rows if r.champion is not None and r.challenger is not None]
    agreement = sum(r.champion == r.challenger for r in both) / len(both) if both else None
    cov_champion = sum(r.champion is not None for r in rows) / n if n else 0.0
    cov_challenger = sum(r.challenger is not None for r in rows) / n if n else 0.0
    corrected = [r for r in rows if r.label is not None]
    champion_wrong = sum(r.champion is not None and r.champion != r.label for r in corrected)
    challenger_wrong = sum(r.challenger is not None and r.challenger != r.label for r in corrected)
    reasons = []
    if n and cov_challenger < cov_champion - coverage_margin:
        reasons.append(
            f"live coverage {cov_challenger:.3f} vs the champion's {cov_champion:.3f} (margin {coverage_margin})"
        )
    if challenger_wrong > champion_wrong:
        reasons.append(f"wrong on {challenger_wrong} corrected live texts vs the champion's {champion_wrong}")
    if agreement is not None and agreement < min_agreement and not champion_wrong > challenger_wrong:
        reasons.append(f"live agreement {agreement:.3f} < {min_agreement} and the corrections do not side with it")
    return ShadowVerdict(
        passed=not reasons,
        reasons=reasons,
        note="" if n else "no live text in shadow: promoted on the offline gate alone",
        n=n,
        agreement=agreement,
        champion_coverage=cov_champion,
        challenger_coverage=cov_challenger,
        corrected=len(corrected),
        champion_wrong=champion_wrong,
        challenger_wrong=challenger_wrong,
    )


@dataclass(frozen=True)
class WatchVerdict:
    """A published version's error on corrected answers against its predecessor's, and whether to roll back."""

    rollback: bool
    reason: str
    n: int  # corrected texts the version answered
    wrong: int
    n_before: int  # corrected texts the predecessor answered
    wrong_before: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def judge_watch(n: int, wrong: int, n_before: int, wrong_before: int, margin: float, alpha: float) -> WatchVerdict:
    """Roll back when the version's error on its corrected answers exceeds the predecessor's by more than
    `margin` and the excess is significant (one-sided Fisher exact test at `alpha`). Without corrected answers
    of the predecessor there is nothing to compare with: no rollback. (Corrections are not a random sample —
    reviewers see the disputed texts first — but the same selection applies to both versions.)"""
    err = wrong / n if n else 0.0
    err_before = wrong_before / n_before if n_before else 0.0
    table = [[wrong, n - wrong], [wrong_before, n_before - wrong_before]]
    p = float(fisher_exact(table, alternative="greater")[1]) if n and n_before else 1.0
    worse = err > err_before + margin and p < alpha
    reason = (
        f"error on corrected answers {err:.3f} ({wrong}/{n}) vs the predecessor's {err_before:.3f} "
        f"({wrong_before}/{n_before}); one-sided Fisher p = {p:.3g}"
    )
    return WatchVerdict(worse, reason, n, wrong, n_before, wrong_before, p)


class Rollout:
    """The shadow and watch steps of a trainer service, taken every check interval."""

    def __init__(self, service: TrainerService) -> None:
        self.svc = service
        self._shadow_cores: tuple[Path, list[Any]] | None = None  # the candidate in shadow, its loaded voter cores

    async def loop(self) -> None:
        """Forever: one shadow step, one watch step, then sleep a check interval."""
        while True:
            try:
                await self.shadow_step()
                await self.watch_step()
            except Exception:  # noqa: BLE001 - a failed step is retried at the next interval
                log.exception("trainer: the rollout step failed")
            await asyncio.sleep(self.svc.settings.trainer_check_interval_s)

    # --- shadow -----------------------------------------------------------------------------------------------

    async def enter_shadow(self, run_id: str, candidate: Path, champion: Path | None, progress: str) -> None:
        """Hold a gated challenger in shadow (a newer one replaces one still there)."""
        svc = self.svc
        for older in await svc.store.with_status("shadow"):
            await self._reject(older, f"superseded in shadow by run {run_id}")
        shadow = {"since": datetime.now(UTC).isoformat(), "candidate": str(candidate), "champion": _name(champion)}
        await svc.store.update(
            run_id, status="shadow", rollout={"shadow": shadow}, progress=f"{progress}; in shadow on live traffic"
        )
        telemetry.ROLLOUT_EVENTS.labels("shadow").inc()
        log.info("trainer: run %s passed the gate; its candidate decides live texts in shadow", run_id)

    async def shadow_step(self) -> None:
        """Decide the newest live texts with the challenger in shadow; judge it once it has seen enough."""
        svc, s = self.svc, self.svc.settings
        runs = await svc.store.with_status("shadow")
        if not runs:
            return
        run = runs[-1]
        info = run["rollout"]["shadow"]
        champion = svc.champion()
        if _name(champion) != info["champion"]:
            await self._reject(run, f"the champion changed ({info['champion']} → {_name(champion)}) while in shadow")
            return
        served_by = f"arbiter-{_name(champion)}"
        seen = await svc.store.shadow_seen(run["run_id"])
        wanted = s.trainer_shadow_texts - len(seen)
        live = await svc.feedback.live_decisions(_when(info["since"]), served_by, seen, wanted) if wanted > 0 else []
        if live:
            decided = await asyncio.to_thread(self._decide, Path(info["candidate"]), [r["text"] for r in live])
            rows = [
                (r["text_id"], served_by, r["answer"], answer, confidence)
                for r, (answer, confidence) in zip(live, decided, strict=True)
            ]
            await svc.store.add_shadow(run["run_id"], rows)
            for row in rows:
                outcome = "abstain" if row[3] is None or row[2] is None else "agree" if row[2] == row[3] else "disagree"
                telemetry.SHADOW_TEXTS.labels(outcome).inc()
        n = len(seen) + len(live)
        waited = (datetime.now(UTC) - _when(info["since"])).total_seconds()
        if n < s.trainer_shadow_texts and waited < s.trainer_shadow_max_s:
            if live:
                await svc.store.update(run["run_id"], progress=f"in shadow: {n}/{s.trainer_shadow_texts} live texts")
            return
        await self._judge(run, info)

    def _decide(self, bundle: Path, texts: list[str]) -> list[tuple[str | None, float]]:
        """The bundle's decisions as the services would make them: (answer or None when it abstains, confidence).

        Its voter cores are loaded once per candidate (a MiniLM bundle takes seconds to load), not every step."""
        from flockwatch.trainer.evaluate import decide_all, load_cores

        if self._shadow_cores is None or self._shadow_cores[0] != bundle:
            self._shadow_cores = None  # the previous candidate's cores go before the next one's load
            self._shadow_cores = (bundle, load_cores(bundle))
        run = decide_all(bundle, texts, cores=self._shadow_cores[1])
        return [(None if d.abstain else d.prediction, float(d.confidence)) for d in run.decisions]

    async def _judge(self, run: dict[str, Any], info: dict[str, Any]) -> None:
        svc, s = self.svc, self.svc.settings
        decisions = await svc.store.shadow_decisions(run["run_id"])
        labels = await svc.feedback.latest_labels([d["text_id"] for d in decisions])
        rows = [
            ShadowRow(d["champion_prediction"], d["challenger_prediction"], labels.get(d["text_id"])) for d in decisions
        ]
        verdict = judge_shadow(rows, s.trainer_shadow_min_agreement, s.trainer_shadow_coverage_margin)
        rollout = {**run["rollout"], "shadow": {**info, "verdict": verdict.to_dict()}}
        if not verdict.passed:
            await svc.store.update(run["run_id"], rollout=rollout)
            await self._reject(run, "in shadow: " + "; ".join(verdict.reasons))
            return
        telemetry.ROLLOUT_EVENTS.labels("promoted").inc()
        summary = f"agreement {verdict.agreement}" if verdict.agreement is not None else verdict.note or "no overlap"
        await svc.promote(
            run["run_id"],
            Path(info["candidate"]),
            rollout,
            f"promoted after shadow on {verdict.n} live texts ({summary})",
        )

    async def _reject(self, run: dict[str, Any], why: str) -> None:
        telemetry.ROLLOUT_EVENTS.labels("rejected_in_shadow").inc()
        await self.svc.finish(run["run_id"], "rejected", progress=why[:1000])
        shutil.rmtree(self.svc.settings.models_root / ".runs" / run["run_id"], ignore_errors=True)

    # --- watch ------------------------------------------------------------------------------------------------

    def watching(self, previous: str | None) -> dict[str, Any] | None:
        """The watch record of a version published now over `previous` (None: the watch is off)."""
        if self.svc.settings.trainer_watch_corrections <= 0 or previous is None:
            return None
        return {"state": "watching", "previous": previous, "since": datetime.now(UTC).isoformat()}

    async def watch_step(self) -> None:
        """Roll the newest published version back when its corrected answers say it does worse than before."""
        svc, s = self.svc, self.svc.settings
        if s.trainer_watch_corrections <= 0:
            return
        run = await svc.store.last_published()
        watch = ((run or {}).get("rollout") or {}).get("watch")
        if run is None or not watch or watch.get("state") != "watching":
            return
        version, previous, root = run["published_version"], watch["previous"], s.models_root
        if registry.current_version(root) != version:
            await self._watched(run, {**watch, "state": "superseded"})
            return
        n, wrong = await svc.feedback.corrected_answers(f"arbiter-{version}")
        if n < s.trainer_watch_corrections:
            return
        n_before, wrong_before = await svc.feedback.corrected_answers(f"arbiter-{previous}")
        verdict = judge_watch(n, wrong, n_before, wrong_before, s.trainer_watch_margin, s.trainer_watch_alpha)
        if not verdict.rollback:
            telemetry.ROLLOUT_EVENTS.labels("kept").inc()
            await self._watched(run, {**watch, "state": "kept", "verdict": verdict.to_dict()})
            return
        target = await asyncio.to_thread(
            registry.rollback, root, previous, by="trainer", reason=verdict.reason, run_id=run["run_id"]
        )
        await svc.bus.publish([registry.announcement(target, s.bundle_key)])
        telemetry.ROLLOUT_EVENTS.labels("rolled_back").inc()
        log.warning("trainer: %s rolled back to %s: %s", version, previous, verdict.reason)
        await self._watched(run, {**watch, "state": "rolled back", "verdict": verdict.to_dict()})

    async def _watched(self, run: dict[str, Any], watch: dict[str, Any]) -> None:
        rollout = {**(run.get("rollout") or {}), "watch": watch}
        note = f"live watch: {watch['state']}" + (f" ({watch['verdict']['reason']})" if "verdict" in watch else "")
        await self.svc.store.update(run["run_id"], rollout=rollout, progress=note[:1000])


def _name(bundle: Path | None) -> str | None:
    return bundle.name if bundle is not None else None


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)
