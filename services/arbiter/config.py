"""`conformal.yaml`: the arbiter's guarantees — set level, conformity score, Mondrian groups, risk target, cascade."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from flockwatch.common.yamlconfig import load_model
from pydantic import BaseModel, ConfigDict, Field, model_validator


class RiskConfig(BaseModel):
    """Selective risk control: the (harm-weighted) error among answered texts stays ≤ target w.p. ≥ 1 − delta."""

    model_config = ConfigDict(extra="forbid")

    target: float = Field(0.05, gt=0, lt=1, description="Largest acceptable error rate among answered texts.")
    delta: float = Field(0.1, gt=0, lt=1, description="The bound may fail with at most this probability.")
    harm_weighted: bool = Field(True, description="Weigh a mistake by the harm of the classes it confuses.")
    grid: int = Field(200, ge=10, le=5000, description="How many confidence thresholds learn-then-test tries.")
    starts: int = Field(4, ge=1, le=50, description="Fixed-sequence test starts along the thresholds (δ split).")


class CascadeConfig(BaseModel):
    """Ask the expensive voters only for texts the cheap voters are unsure of, within a call budget."""

    model_config = ConfigDict(extra="forbid")

    voters: list[str] = Field(default_factory=lambda: ["llm"], description="The expensive voters.")
    budget: float = Field(0.10, gt=0, le=1, description="Largest share of texts sent to the expensive voters.")
    deadline_ms: float = Field(3000, gt=0, description="How long the arbiter waits for an expensive vote.")


class ConformalConfig(BaseModel):
    """All of `conformal.yaml`."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.05, gt=0, lt=1, description="Prediction sets miss the true class w.p. ≤ alpha.")
    method: Literal["lac", "aps", "raps"] = Field("lac", description="MAPIE conformity score.")
    mondrian: list[Literal["slice", "class"]] = Field(
        default_factory=lambda: ["slice"], description="Calibrate per slice and/or per true class."
    )
    consensus_min_prob: float = Field(0.9, gt=0.5, le=1, description="Consensus fast path: every voter ≥ this.")
    risk: RiskConfig = Field(default_factory=RiskConfig)
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)

    @model_validator(mode="after")
    def _unique(self) -> ConformalConfig:
        if len(set(self.mondrian)) != len(self.mondrian):
            raise ValueError("mondrian lists a group kind twice")
        return self

    @property
    def min_group_size(self) -> int:
        """Fewest calibration points a group needs for a finite quantile at level 1 − alpha."""
        # theory needs ⌈1/α⌉ − 1 (99 at α = 0.01); MAPIE refuses fewer than 1/α + 1 scores (101)
        return max(1, math.floor(1 / self.alpha + 1e-9) + 1)

    @classmethod
    def load(cls, path: Path | str | None) -> ConformalConfig:
        """Load `conformal.yaml`; the defaults when no path is given."""
        return cls() if path is None else load_model(path, cls)
