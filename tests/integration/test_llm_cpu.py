"""The LLM voter with the real SmolLM2-135M on CPU: set-up, a tiny LoRA run, reload, scoring, a vote on the bus."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

pytest.importorskip("peft")
from flockwatch.common import topics  # noqa: E402
from flockwatch.common.artifacts import Manifest, write_manifest  # noqa: E402
from flockwatch.common.bus import create_bus  # noqa: E402
from flockwatch.common.datasets import read_table, split  # noqa: E402
from flockwatch.common.events import Event, Vote, VoteRequested  # noqa: E402
from flockwatch.common.labels import LabelConfig  # noqa: E402
from flockwatch.llm_voter.app import LLMVoterService, load_core  # noqa: E402
from flockwatch.llm_voter.config import EarlyStopping, LoraConfig  # noqa: E402
from flockwatch.llm_voter.lora import LLM_JSON, train_lora  # noqa: E402
from flockwatch.llm_voter.model import LLMCore  # noqa: E402
from flockwatch.llm_voter.settings import LLMSettings  # noqa: E402
from flockwatch.llm_voter.setup_model import convert, gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = Path(os.environ.get("FLOCKWATCH_LLM_TEST_BASE", ROOT / "models" / "base" / "smollm2-135m-instruct"))
TINY = LoraConfig(
    max_steps=2,
    batch_size=4,
    max_train=16,
    temperature_max=8,
    label_words={"sms": {"ham": "personal", "spam": "advert"}},
    early_stopping=EarlyStopping(eval_every=2, val_max=8),
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, data_files: dict[str, Path]) -> Path:
    """A converted base model (once, shared) and a bundle whose llm/ holds a 2-step adapter."""
    import torch

    torch.set_num_threads(2)
    try:
        gguf_path()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    convert(BASE)
    parts = split(read_table(data_files["sms"], "text", "label"))
    labels = LabelConfig.load(ROOT / "configs" / "sms" / "labels.yaml")
    out = tmp_path_factory.mktemp("llm-bundle")
    train, cal = parts["train"], parts["calibration"]
    result = train_lora(train.texts, train.labels, cal.texts, cal.labels, labels, TINY, BASE, out / "llm")
    assert result.steps == 2 and result.history and result.temperature > 0
    write_manifest(out, Manifest(name="sms", version="t1", components={"llm": "t1"}))
    return out


def test_setup_is_idempotent(bundle: Path) -> None:
    before = (BASE / "model.safetensors").stat().st_mtime
    assert convert(BASE) == BASE and (BASE / "model.safetensors").stat().st_mtime == before


def test_trained_adapter_reloads_and_scores_texts(bundle: Path) -> None:
    assert (bundle / "llm" / "adapter" / "adapter_config.json").exists() and (bundle / "llm" / LLM_JSON).exists()
    core = load_core(bundle, LLMSettings(llm_base_model=BASE))
    assert isinstance(core, LLMCore) and core.version == "t1"
    opinions = core.predict(["Are we still on for dinner tonight?", "WINNER! Claim your £1000 prize, call 09061"])
    assert len(opinions["llm"]) == 2
    for op in opinions["llm"]:
        assert op.abstains or sum((op.probabilities or {}).values()) == pytest.approx(1.0)
    assert core.counts.scored == 2


def test_a_bundle_without_llm_artifact_gives_no_core(tmp_path: Path) -> None:
    write_manifest(tmp_path, Manifest(name="x", version="1"))
    assert load_core(tmp_path) is None


@pytest.mark.parametrize("url", ["memory://", "redis://127.0.0.1:6379/12"])
async def test_service_answers_only_its_vote_requests(bundle: Path, url: str) -> None:
    if url.startswith("redis"):
        import redis.asyncio as aioredis

        await aioredis.from_url(url).flushdb()
    settings = LLMSettings(bus_url=url, model_dir=bundle, llm_base_model=BASE, llm_mode="cascade")
    bus = create_bus(settings)
    service = LLMVoterService(bus, settings)
    votes: list[Vote] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group="test-votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    await service.start()
    request = VoteRequested(
        message_id=VoteRequested.id_for("t1"),
        text_id="t1",
        text="Free entry! Text WIN to 80086",
        voters=["llm"],
        reason="cheap voters split: {ham, spam}",
        deadline_ms=60_000,
    )
    other = VoteRequested(
        message_id=VoteRequested.id_for("t2"), text_id="t2", text="hi", voters=["ws"], reason="-", deadline_ms=60_000
    )
    async with bus:
        await bus.publish([request, other])
        for _ in range(600):
            if votes:
                break
            await asyncio.sleep(0.05)
    assert [(v.text_id, v.voter, v.model_version) for v in votes] == [("t1", "llm", "t1")]
