"""LLM voter service: asked by the arbiter (cascade) or on every text; hot-reloads adapters; two backends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from flockwatch.common.artifacts import load_json, read_manifest, verified_file
from flockwatch.common.bus import Bus
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.settings import CommonSettings
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
        llm = settings if isinstance(settings, LLMSettings) else LLMSettings(**settings.model_dump())
        super().__init__(bus, llm, mode=llm.llm_mode)

    def load(self, model_dir: Path) -> VoterCore | None:
        return load_core(model_dir, cast(LLMSettings, self.settings))
