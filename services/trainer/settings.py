"""Trainer service settings: environment variables `FLOCKWATCH_TRAINER_*`, plus the common `FLOCKWATCH_*` ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flockwatch.common.settings import CommonSettings
from pydantic import Field

SCHEMA = r"^[a-z_][a-z0-9_]{0,62}$"


class TrainerSettings(CommonSettings):
    """What the trainer trains on, when it retrains, how it gates, and where it keeps its runs."""

    trainer_host: str = "127.0.0.1"
    trainer_port: int = Field(8020, ge=0, le=65535, description="HTTP port (0: any free port).")
    trainer_serve_http: bool = True
    trainer_url: str = Field("http://127.0.0.1:8020", description="Where `flockwatch retrain` finds the service.")
    trainer_database_url: str = Field("postgresql://postgres@127.0.0.1:5432/test", description="PostgreSQL DSN.")
    trainer_db_schema: str = Field("trainer", pattern=SCHEMA, description="Schema of the runs and drift tables.")
    trainer_feedback_schema: str = Field("feedback", pattern=SCHEMA, description="The feedback service's schema.")
    trainer_migrate: bool = True
    trainer_models_root: Path | None = Field(
        None, description="Model root (versions, current); default: MODEL_DIR's parent."
    )
    # training data and configuration (a file left unset: the champion bundle's copy)
    trainer_data: Path = Field(Path("data/sms.csv"), description="The base training data (CSV or JSONL).")
    trainer_text_col: str = "text"
    trainer_label_col: str = "label"
    trainer_base_limit: int | None = Field(None, ge=10, description="Use only the first N base rows (tests, demos).")
    trainer_labels: Path | None = None
    trainer_rules: Path | None = None
    trainer_slices: Path | None = None
    trainer_conformal: Path | None = None
    trainer_lfs: Path | None = None
    trainer_llm: Path | None = Field(None, description="llm_lora.yaml: retrain the LoRA adapter too.")
    trainer_llm_min_corrections: int = Field(200, ge=0, description="…but only with at least this many corrections.")
    trainer_llm_base: Path | None = None
    trainer_embedding: Path | None = Field(None, description="A sentence-transformers folder: the minilm voter.")
    trainer_folds: int = Field(5, ge=2, le=20)
    # triggers
    trainer_min_corrections: int = Field(50, ge=1, description="Retrain after this many new clean corrections.")
    trainer_check_interval_s: float = Field(30.0, gt=0, description="How often the triggers are checked.")
    trainer_settle_s: float = Field(
        10.0, ge=0, description="…once no correction has arrived for this long (a review session is over)."
    )
    trainer_schedule_s: float | None = Field(None, gt=0, description="Also retrain this often (if anything is new).")
    # gate
    trainer_gate_alpha: float = Field(0.05, gt=0, lt=1, description="A drop is significant below this p-value.")
    trainer_gate_bootstrap: int = Field(2000, ge=100)
    trainer_gate_min_class_f1: float = Field(0.3, ge=0, le=1)
    trainer_gate_calibration_gain: float = Field(0.05, ge=0, lt=1, description="ECE cut a calibration-only run needs.")
    trainer_gate_min_slice_n: int = Field(20, ge=1)
    trainer_gate_coverage: bool = Field(True, description="Also refuse a significant drop in answered texts …")
    trainer_gate_coverage_margin: float = Field(0.25, ge=0, le=1, description="… of more than this share.")
    # drift
    trainer_drift: bool = Field(True, description="Monitor the decisions' nonconformity for drift.")
    trainer_drift_delta: float = Field(0.01, gt=0, lt=1, description="Alarm when the martingale reaches 1/δ.")
    trainer_drift_jump: float = Field(0.01, gt=0, lt=1)
    trainer_drift_window: int = Field(200, ge=10, description="Latest scores in the reported KS test.")
    trainer_drift_action: bool = Field(
        True, description="A drift alarm queues a calibration-only run (then a full one)."
    )
    # safe rollout (rollout.py)
    trainer_shadow_texts: int = Field(
        0, ge=0, description="A gated challenger first decides this many live texts in shadow (0: publish at once)."
    )
    trainer_shadow_max_s: float = Field(3600.0, gt=0, description="…or for at most this long, then it is judged.")
    trainer_shadow_min_agreement: float = Field(
        0.5, ge=0, le=1, description="Reject below this live agreement with the champion, unless corrections back it."
    )
    trainer_shadow_coverage_margin: float = Field(
        0.05, ge=0, le=1, description="Reject when its live answered share trails the champion's by more."
    )
    trainer_watch_corrections: int = Field(
        0, ge=0, description="After a publish, judge the version on this many corrected answers (0: no watch)."
    )
    trainer_watch_margin: float = Field(
        0.05, ge=0, le=1, description="Roll back when its error on them exceeds its predecessor's by more …"
    )
    trainer_watch_alpha: float = Field(0.05, gt=0, lt=1, description="… and the excess is significant at this level.")
    trainer_max_queued: int = Field(
        5, ge=1, le=1000, description="Refuse (HTTP 429) to queue a run while this many runs are queued."
    )
    trainer_cancel_grace_s: float = Field(5.0, ge=0, description="SIGTERM, then SIGKILL after this long.")

    @property
    def models_root(self) -> Path:
        """The model root: versions, `current`, history.jsonl."""
        if self.trainer_models_root is not None:
            return self.trainer_models_root
        bundle = self.model_dir.name == "current" or (self.model_dir / "manifest.json").exists()
        return self.model_dir.parent if bundle else self.model_dir

    def gate_config(self) -> dict[str, Any]:
        """The gate's thresholds as GateConfig keyword arguments."""
        return {
            "alpha": self.trainer_gate_alpha,
            "n_boot": self.trainer_gate_bootstrap,
            "min_class_f1": self.trainer_gate_min_class_f1,
            "calibration_gain": self.trainer_gate_calibration_gain,
            "min_slice_n": self.trainer_gate_min_slice_n,
            "coverage": self.trainer_gate_coverage,
            "coverage_margin": self.trainer_gate_coverage_margin,
        }

    def config_files(self) -> dict[str, Path | None]:
        """Task configuration for the runs (None: the champion's copy, or none)."""
        return {
            "labels": self.trainer_labels,
            "rules": self.trainer_rules,
            "slices": self.trainer_slices,
            "conformal": self.trainer_conformal,
            "lfs": self.trainer_lfs,
            "llm": self.trainer_llm,
            "llm_base": self.trainer_llm_base,
            "embedding": self.trainer_embedding,
        }
