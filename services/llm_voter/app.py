"""LLM voter service: asked by the arbiter (cascade) or on every text; hot-reloads adapters; two backends."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from flockwatch.common import telemetry, topics
from flockwatch.common.artifacts import load_json, read_manifest, verified_file
from flockwatch.common.bus import Bus
from flockwatch.common.events import ModelPublished, TextSubmitted, Vote, VoteRequested
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.settings import CommonSettings
from flockwatch.common.voting import to_vote
from flockwatch.llm_voter.backends import LLMBackend, TransformersBackend, VLLMBackend
from flockwatch.llm_voter.lora import ADAPTER_DIR, LLM_JSON
from flockwatch.llm_voter.model import LLMCore
from flockwatch.llm_voter.prompt import Prompt
from flockwatch.llm_voter.settings import LLMSettings

log = logging.getLogger(__name__)
PART = "llm"


def load_core(model_dir: Path, settings: LLMSettings | None = None) -> VoterCore | None:
    """The bundle's LLM voter (every `llm/` file sha256-verified first), or None when the bundle has none."""
    settings = settings or LLMSettings()
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, verify=False)
    if f"{PART}/{LLM_JSON}" not in manifest.files:
        return None
    for rel in manifest.files:
        if rel.startswith(f"{PART}/"):
            verified_file(model_dir, rel)
    info = load_json(model_dir, f"{PART}/{LLM_JSON}")
    prompt = Prompt.from_json(info["prompt"])
    version = manifest.components.get(PART, manifest.version)
    backend: LLMBackend
    if settings.llm_backend == "vllm":
        backend = VLLMBackend(
            prompt,
            settings.llm_vllm_url,
            adapter_name=f"{prompt.task}-{version}",
            adapter_path=str(adapter_path_for_server(model_dir, settings)),
            api_key=settings.llm_vllm_api_key,
            timeout_s=settings.llm_vllm_timeout_s,
        )
    else:
        backend = TransformersBackend(
            prompt,
            settings.llm_base_model or Path(info["base_model"]["path"]),
            model_dir / PART / ADAPTER_DIR,
            bf16=info.get("bf16", True) if settings.llm_bf16 is None else settings.llm_bf16,
            batch_size=settings.llm_batch_size,
        )
    return LLMCore(backend, prompt.names, version, float(info["temperature"]), float(info["min_label_mass"]))


def adapter_path_for_server(model_dir: Path, settings: LLMSettings) -> Path:
    """The adapter folder as the vLLM server sees it: `<adapter_root>/<model root>/<version>/llm/adapter`."""
    real = model_dir.resolve()
    if settings.llm_vllm_adapter_root is None:
        return real / PART / ADAPTER_DIR
    return settings.llm_vllm_adapter_root / real.parent.name / real.name / PART / ADAPTER_DIR


class LLMVoterService(VoterService):
    """Votes as `llm`: on the arbiter's VoteRequested (cascade) or on every TextSubmitted (always)."""

    name = "llm_voter"

    def __init__(self, bus: Bus, settings: CommonSettings) -> None:
        # not VoterService.__init__: in cascade mode this voter must not consume every submitted text
        self.settings = settings if isinstance(settings, LLMSettings) else LLMSettings(**settings.model_dump())
        self.core: VoterCore | None = None
        self.expired = 0
        if self.settings.llm_mode == "always":
            bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=self.name)(self.on_texts)
        else:
            bus.subscribe(topics.VOTE_REQUESTED, VoteRequested, group=self.name)(self.on_requests)
        bus.subscribe(topics.MODEL_PUBLISHED, ModelPublished, group=self.name, broadcast=True)(self.on_model)

    def load(self, model_dir: Path) -> VoterCore | None:
        return load_core(model_dir, cast(LLMSettings, self.settings))

    async def on_requests(self, msgs: list[VoteRequested]) -> list[Vote]:
        """Vote on the texts the arbiter asked this voter about, skipping requests already past their deadline."""
        core = self.core
        if core is None:
            return []
        now = datetime.now(UTC)
        wanted = [m for m in msgs if set(m.voters) & set(core.voters)]
        fresh = [m for m in wanted if (now - m.timestamp).total_seconds() * 1000 < m.deadline_ms]
        self.expired += len(wanted) - len(fresh)
        if not fresh:
            return []
        start = time.perf_counter()
        opinions = await asyncio.to_thread(core.predict, [m.text for m in fresh])
        per_text_ms = (time.perf_counter() - start) * 1000 / len(fresh)
        # to_vote reads only the text id, which a VoteRequested carries too
        votes = [
            to_vote(cast(TextSubmitted, msg), voter, core.version, opinion, per_text_ms)
            for voter, column in opinions.items()
            for msg, opinion in zip(fresh, column, strict=True)
        ]
        for vote in votes:
            telemetry.VOTES.labels(vote.voter, "abstain" if vote.abstain else "vote").inc()
        return votes
