"""Slice configuration (`slices.yaml`): named subsets of texts whose quality is reported on its own."""

from __future__ import annotations

import re
from pathlib import Path

from flockwatch.common.yamlconfig import load_model
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SliceSpec(BaseModel):
    """A slice: texts matching every given condition (pattern, length range, metadata values)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str = ""
    pattern: str | None = Field(None, description="Regular expression searched in the text (case-insensitive).")
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    metadata: dict[str, str] = Field(default_factory=dict, description="Metadata keys that must equal these.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return pattern

    @model_validator(mode="after")
    def _has_condition(self) -> SliceSpec:
        if self.pattern is None and self.min_chars is None and self.max_chars is None and not self.metadata:
            raise ValueError("a slice needs at least one condition (pattern, min_chars, max_chars, metadata)")
        return self

    def contains(self, text: str, metadata: dict[str, str] | None = None) -> bool:
        """Whether a text belongs to this slice."""
        if self.pattern is not None and not re.search(self.pattern, text, re.IGNORECASE):
            return False
        if self.min_chars is not None and len(text) < self.min_chars:
            return False
        if self.max_chars is not None and len(text) > self.max_chars:
            return False
        meta = metadata or {}
        return all(meta.get(k) == v for k, v in self.metadata.items())


class SliceConfig(BaseModel):
    """All slices of a task."""

    model_config = ConfigDict(extra="forbid")

    slices: list[SliceSpec] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path | str) -> SliceConfig:
        """Load and validate `slices.yaml`."""
        return load_model(path, cls)

    def members(self, texts: list[str]) -> dict[str, list[int]]:
        """Indices of the texts in each slice."""
        return {s.name: [i for i, t in enumerate(texts) if s.contains(t)] for s in self.slices}
