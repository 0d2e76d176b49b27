"""The label configuration (`labels.yaml`: classes, descriptions, harm weights)."""

from __future__ import annotations

from pathlib import Path

from flockwatch.common.yamlconfig import load_model
from pydantic import BaseModel, ConfigDict, Field, field_validator


class LabelSpec(BaseModel):
    """One class."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str = ""
    harm: float = Field(1.0, ge=0, description="Cost weight of getting this class wrong; orders 'at least'.")


class LabelConfig(BaseModel):
    """All classes of a task, in a fixed order (the order of probability vectors)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    description: str = ""
    labels: list[LabelSpec] = Field(min_length=2)

    @field_validator("labels")
    @classmethod
    def _unique(cls, labels: list[LabelSpec]) -> list[LabelSpec]:
        names = [label.name for label in labels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate label names: {', '.join(dupes)}")
        return labels

    @property
    def names(self) -> list[str]:
        """Class names in their configured order."""
        return [label.name for label in self.labels]

    def harm(self, name: str) -> float:
        """Harm weight of a class."""
        return next(label.harm for label in self.labels if label.name == name)

    def at_least(self, name: str) -> list[str]:
        """The classes whose harm is at least that of `name` (what a safety floor allows)."""
        floor = self.harm(name)
        return [label.name for label in self.labels if label.harm >= floor]

    @classmethod
    def load(cls, path: Path | str) -> LabelConfig:
        """Load and validate `labels.yaml`."""
        return load_model(path, cls)

    @classmethod
    def from_names(cls, task: str, names: list[str]) -> LabelConfig:
        """Equal-harm labels for a dataset that comes without a labels file."""
        return cls(task=task, labels=[LabelSpec(name=n) for n in names])
