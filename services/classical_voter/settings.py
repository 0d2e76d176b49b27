"""Embedding voter settings: environment variables `FLOCKWATCH_EMBEDDING_*`, plus the common `FLOCKWATCH_*` ones."""

from pathlib import Path
from typing import Literal

from flockwatch.common.settings import CommonSettings
from pydantic import Field


class EmbeddingSettings(CommonSettings):
    """When the embedding voter votes, and how it embeds."""

    embedding_mode: Literal["cascade", "always", "auto"] = Field(
        "auto",
        description="auto: as the bundle's policy says (a cascade tier, or every text); cascade: vote only when "
        "the arbiter asks (VoteRequested naming the voter); always: every text.",
    )
    embedding_encoder: Path | None = Field(
        None,
        description="The sentence-transformers folder; default: the one the bundle records (same sha256 required).",
    )
    embedding_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Texts per encoder forward pass (each handler batch is sorted by length first); None: 32 for "
        "a frozen encoder, the bundle's (32) for a fine-tuned one.",
    )
    embedding_cache_size: int = Field(
        20_000, ge=0, description="Embeddings kept by text hash (LRU; 0: no cache); ≈ 1.5 KB each for MiniLM."
    )
    embedding_threads: int | None = Field(
        None,
        ge=1,
        description="Torch intra-op threads of the voter's process (None: torch's default, one per core). "
        "On a box the whole pipeline shares, 1 costs the least CPU per text.",
    )
    embedding_quantize: bool | None = Field(
        None,
        description="A fine-tuned encoder's Linear layers in dynamic int8 (None: as the bundle was scored at "
        "training time, so the stacker saw the outputs it will get).",
    )
    embedding_backend: Literal["torch", "onnxruntime"] = Field(
        "torch",
        description="What runs a fine-tuned encoder: torch, or ONNX Runtime (exported at load; needs the "
        "onnxruntime and onnx packages; ~15-30 % less CPU per text than torch's int8 here).",
    )
