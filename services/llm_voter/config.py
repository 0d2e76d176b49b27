"""`llm_lora.yaml`: LoRA hyper-parameters, training budget, early stopping on validation ECE, label words."""

from __future__ import annotations

from pathlib import Path

from flockwatch.common.yamlconfig import load_model
from pydantic import BaseModel, ConfigDict, Field, model_validator


class EarlyStopping(BaseModel):
    """Evaluate every `eval_every` steps on the validation split; stop when the best checkpoint stops changing.

    The best checkpoint is the lowest-ECE one among those within `f1_tolerance` of the best macro-F1 seen.
    """

    model_config = ConfigDict(extra="forbid")

    eval_every: int = Field(20, ge=1, description="Optimizer steps between validation evaluations.")
    patience: int = Field(2, ge=1, description="Evaluations without a new best checkpoint before training stops.")
    min_delta: float = Field(0.002, ge=0, description="An ECE must drop by more than this to count as better.")
    f1_tolerance: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Only checkpoints within this of the best macro-F1 of all compete on ECE: a constant "
        "prior-matching predictor has a low ECE and no skill.",
    )
    val_max: int = Field(256, ge=8, description="Validation texts used for the ECE tracking.")


class LoraConfig(BaseModel):
    """All of `llm_lora.yaml`."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    learning_rate: float = Field(5e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0, description="Passes over the (capped) training examples.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, le=256)
    max_train: int | None = Field(600, ge=8, description="Cap on training examples (stratified); None: all.")
    max_text_chars: int = Field(400, ge=16, description="Texts are cut to this many characters in the prompt.")
    abstain_fraction: float = Field(
        0.05,
        ge=0,
        lt=0.5,
        description="Share of synthetic 'no answer possible' examples labelled with the abstain word.",
    )
    abstain_word: str = Field("unknown", min_length=1, description="The word the model answers when it cannot tell.")
    label_words: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Per task: class name → the single-token word the model answers. Classes not listed use their "
        "lower-cased name, which must then be a single token.",
    )
    min_label_mass: float = Field(
        0.5, ge=0, le=1, description="Below this total probability on the answer words the output is invalid."
    )
    temperature_max: int = Field(512, ge=8, description="Calibration texts used to fit the temperature.")
    bf16: bool = Field(True, description="bf16 autocast on CPU (≈3× faster matmuls); weights stay float32.")
    load_in_4bit: bool = Field(False, description="On a CUDA GPU: load the base in 4 bit (bitsandbytes, QLoRA).")
    seed: int = 0
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)

    @model_validator(mode="after")
    def _words_distinct(self) -> LoraConfig:
        for task, words in self.label_words.items():
            values = [w.strip() for w in words.values()]
            if len(set(values)) != len(values) or self.abstain_word in values:
                raise ValueError(f"label_words.{task}: the words (and the abstain word) must be distinct")
        return self

    def words_for(self, task: str, names: list[str]) -> list[str]:
        """The answer word of each class, in `names` order (configured, or the lower-cased class name)."""
        mapping = self.label_words.get(task, {})
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise ValueError(f"label_words.{task} names classes the task does not have: {unknown}")
        words = [mapping.get(name, name.lower()).strip() for name in names]
        if len(set(words)) != len(words) or self.abstain_word in words:
            raise ValueError(f"task {task}: answer words {words} (abstain {self.abstain_word!r}) are not distinct")
        return words

    @classmethod
    def load(cls, path: Path | str | None) -> LoraConfig:
        """Load `llm_lora.yaml`; the defaults when no path is given."""
        return cls() if path is None else load_model(path, cls)
