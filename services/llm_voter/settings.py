"""LLM voter settings: environment variables `FLOCKWATCH_LLM_*`, plus the common `FLOCKWATCH_*` ones."""

from pathlib import Path
from typing import Literal

from flockwatch.common.settings import CommonSettings
from pydantic import Field


class LLMSettings(CommonSettings):
    """Which backend scores the texts, where the vLLM server is, and when the LLM is asked."""

    llm_backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: in-process (CPU); vllm: an OpenAI-compatible vLLM server."
    )
    llm_vllm_url: str = Field("http://127.0.0.1:8000/v1", description="The vLLM server's OpenAI API base URL.")
    llm_vllm_api_key: str = Field("EMPTY", description="API key the vLLM server expects (--api-key).")
    llm_vllm_adapter_root: Path | None = Field(
        None,
        description="Where the vLLM server sees the model bundles (shared volume); default: the same path as here.",
    )
    llm_vllm_timeout_s: float = Field(30.0, gt=0, description="Per-request timeout for the vLLM server.")
    llm_base_model: Path | None = Field(
        None, description="The base model folder (transformers backend); default: the one recorded in llm.json."
    )
    llm_mode: Literal["cascade", "always", "auto"] = Field(
        "auto",
        description="auto: as the bundle's policy says (asked in a cascade tier, or on every text); cascade: vote "
        "only when the arbiter asks (VoteRequested); always: on every text.",
    )
    llm_batch_size: int = Field(16, ge=1, le=512, description="Texts per forward pass (transformers backend).")
    llm_bf16: bool | None = Field(None, description="bf16 autocast on CPU; default: as trained (llm.json).")
