"""The `minilm` voter's fine-tuned option: the sentence encoder trained end to end with a linear head, on CPU.

`FineTunedEncoder` is a scikit-learn-style estimator: mean pooling over the attention mask, one Linear(d, k)
head, AdamW, cross-entropy. Batches are bucketed by token length and padded to their longest text (not to
`max_length`), which is most of the CPU saved on short texts. Probabilities are temperature-scaled; the
temperature is fitted on held-out logits (`calibrate`). Weights travel as safetensors, never pickled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import torch
from flockwatch.classical_voter.model import check_training
from flockwatch.common.metrics import fit_temperature
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import softmax
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

BUCKET = 50  # batches per length bucket: sorted within ~1,600 texts, so batches still mix across epochs


class FinetuneConfig(BaseModel):
    """How the trainer fine-tunes the encoder: the estimator's parameters plus the cross-fitting plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(3, ge=1, description="Epochs of the final model (trained on every train text).")
    fold_epochs: int | None = Field(None, ge=1, description="Epochs of each cross-fitting fold model (None: epochs).")
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=8, description="Tokens per text at most (longer texts are truncated).")
    layers: int | None = Field(None, ge=1, description="Keep the encoder's first N transformer layers (None: all).")
    train_layers: int | None = Field(
        None,
        ge=0,
        description="Fine-tune only the top N transformer layers and the head; the embeddings and lower layers stay"
        " frozen, so no gradient flows through them (None: every layer).",
    )
    folds: int = Field(3, ge=2, description="Stratified folds for the out-of-fold outputs.")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="Torch threads when training in this process (None: torch's).")
    parallel: bool = Field(True, description="Fit the folds and the final model in one-thread spawned processes.")
    dtype: Literal["float32", "float16"] = Field("float16", description="How the weights are stored in the bundle.")
    quantize: bool = Field(True, description="Serve with dynamic int8 Linear layers (the outputs handed on use it).")

    def estimator(self, epochs: int | None = None, threads: int | None = None, encoder: Path | None = None) -> Any:
        """A FineTunedEncoder with these parameters."""
        return FineTunedEncoder(
            epochs=epochs or self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            max_length=self.max_length,
            seed=self.seed,
            threads=threads or self.threads,
            layers=self.layers,
            train_layers=self.train_layers,
            encoder=encoder,
        )


class _Net(torch.nn.Module):
    """Encoder → mean of the unpadded token states → linear head (logits)."""

    def __init__(self, backbone: Any, k: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(int(backbone.config.hidden_size), k)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        logits: torch.Tensor = self.head(pooled)
        return logits


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op threads (None: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def length_batches(lengths: NDArray[np.int64], batch_size: int, rng: np.random.Generator) -> list[NDArray[np.int64]]:
    """Training batches: shuffled, sorted by length within buckets of BUCKET batches, batch order shuffled."""
    order = rng.permutation(len(lengths))
    batches: list[NDArray[np.int64]] = []
    for start in range(0, len(order), batch_size * BUCKET):
        part = order[start : start + batch_size * BUCKET]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class FineTunedEncoder(BaseEstimator):  # type: ignore[misc,unused-ignore]  # sklearn is untyped
    """The packaged MiniLM (or `encoder`, a local folder) fine-tuned end to end with a linear head."""

    net_: torch.nn.Module  # encoder + head (set by fit or from_state)
    tokenizer_: Any

    def __init__(
        self,
        epochs: int = 3,
        lr: float = 5e-5,
        batch_size: int = 32,
        max_length: int = 64,
        seed: int = 0,
        threads: int | None = None,
        layers: int | None = None,
        encoder: Path | None = None,
        infer_batch_size: int = 32,
        train_layers: int | None = None,
    ) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.threads = threads
        self.layers = layers
        self.encoder = encoder
        self.infer_batch_size = infer_batch_size
        self.train_layers = train_layers

    def fit(self, texts: Sequence[str], y: Sequence[str]) -> Self:
        """Fine-tune encoder and head on the texts (deterministic given `seed` and the thread count)."""
        counts = check_training(texts, y, min_per_class=1)
        self.classes_: list[str] = sorted(counts)
        index = {c: i for i, c in enumerate(self.classes_)}
        target = torch.tensor([index[label] for label in y], dtype=torch.long)
        start = time.perf_counter()
        with torch_threads(self.threads):
            torch.manual_seed(self.seed)  # the head's initialisation and dropout
            self._build(self._folder(), len(self.classes_))
            ids = self._tokenize(texts)
            lengths = np.array([len(row) for row in ids], dtype=np.int64)
            optimizer = torch.optim.AdamW(self._trainable(), lr=self.lr)
            rng = np.random.default_rng(self.seed)
            self.net_.train()
            self.losses_: list[float] = []
            for _ in range(self.epochs):
                total = 0.0
                for batch in length_batches(lengths, self.batch_size, rng):
                    loss = torch.nn.functional.cross_entropy(self.net_(*self._pad(ids, batch)), target[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                self.losses_.append(total / len(ids))
            self.net_.eval()
        self.temperature_ = 1.0
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def predict_logits(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """(n, k) raw logits (before the temperature), in `texts` order; length-sorted batches, inference mode."""
        self._check_fitted()
        out = np.empty((len(texts), len(self.classes_)), dtype=np.float32)
        if not len(texts):
            return out
        ids = self._tokenize(texts)
        order = np.argsort([len(row) for row in ids], kind="stable")
        with torch_threads(self.threads), torch.inference_mode():
            for start in range(0, len(order), self.infer_batch_size):
                batch = order[start : start + self.infer_batch_size]
                out[batch] = self.net_(*self._pad(ids, batch)).float().numpy()
        return out

    def predict_proba(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """(n, k) temperature-scaled probabilities in `classes_` order."""
        return self.proba_from_logits(self.predict_logits(texts))

    def proba_from_logits(self, logits: NDArray[Any]) -> NDArray[np.float64]:
        """softmax(logits / temperature_), rows summing to 1."""
        self._check_fitted()
        probs: NDArray[np.float64] = softmax(np.asarray(logits, dtype=np.float64) / self.temperature_, axis=1)
        return probs

    def calibrate(self, logits: NDArray[Any], y: Sequence[str]) -> Self:
        """Fit `temperature_` on held-out logits (e.g. out-of-fold) and their labels."""
        self._check_fitted()
        index = {c: i for i, c in enumerate(self.classes_)}
        self.temperature_ = fit_temperature(logits, np.array([index[label] for label in y], dtype=np.int64))
        return self

    def quantize(self) -> Self:
        """Swap the Linear layers for dynamic int8 ones (inference only: ~2× less CPU per text here)."""
        self._check_fitted()
        with quiet():  # the eager quantization API warns that it moves to torchao (not a dependency here)
            self.net_ = torch.ao.quantization.quantize_dynamic(self.net_, {torch.nn.Linear}, dtype=torch.qint8)
        self.quantized_ = True
        return self

    def round_weights(self, dtype: str) -> Self:
        """Round the weights through `dtype` as they will be stored, so that what is served is what was scored."""
        self._check_fitted()
        with torch.no_grad():
            for tensor in self.net_.state_dict().values():
                tensor.copy_(tensor.to(getattr(torch, dtype)).to(tensor.dtype))
        return self

    def state_tensors(self, dtype: str = "float32") -> dict[str, torch.Tensor]:
        """The weights (encoder and head) as contiguous tensors of `dtype`, for safetensors."""
        self._check_fitted()
        if getattr(self, "quantized_", False):
            raise ValueError("a quantized model cannot be saved; save before quantize()")
        return {name: t.detach().to(getattr(torch, dtype)).contiguous() for name, t in self.net_.state_dict().items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict[str, Any], folder: Path) -> FineTunedEncoder:
        """Rebuild a fitted estimator from saved weights, the info written with them, and the base encoder folder."""
        est = cls(**{**info["params"], "encoder": folder})
        est.classes_ = list(info["classes"])
        with quiet():
            est._build(folder, len(est.classes_), weights=False)
        est.net_.load_state_dict({name: t.float() for name, t in tensors.items()}, strict=True)
        est.net_.eval()
        est.temperature_ = float(info["temperature"])
        return est

    def _folder(self) -> Path:
        from flockwatch.classical_voter.encoder import packaged_minilm

        return Path(self.encoder) if self.encoder is not None else packaged_minilm()

    def _build(self, folder: Path, k: int, weights: bool = True) -> None:
        """Tokenizer and network from the local folder (no hub); without `weights` the encoder is built blank."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.tokenizer_ = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if weights:
            backbone = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:
            backbone = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        if self.layers is not None:  # the first layers only: inference cost falls in proportion
            backbone.encoder.layer = backbone.encoder.layer[: self.layers]
            backbone.config.num_hidden_layers = len(backbone.encoder.layer)
        self.net_ = _Net(backbone, k)
        self.pad_id_ = int(self.tokenizer_.pad_token_id or 0)

    def _trainable(self) -> list[torch.nn.Parameter]:
        """The parameters fine-tuned: all, or (`train_layers`) the top layers and the head, the rest frozen.

        Frozen below means no backward pass through the embeddings and lower layers at all: the first tensor that
        needs a gradient is the first trained layer's output."""
        if self.train_layers is not None:
            backbone: Any = self.net_.backbone
            frozen = len(backbone.encoder.layer) - self.train_layers
            for module in [backbone.embeddings, *backbone.encoder.layer[: max(frozen, 0)]]:
                module.requires_grad_(False)
        return [p for p in self.net_.parameters() if p.requires_grad]

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        rows: list[list[int]] = self.tokenizer_(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return rows

    def _pad(self, ids: list[list[int]], batch: NDArray[np.int64]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of a batch, padded to its longest text."""
        rows = [ids[i] for i in batch]
        width = max(map(len, rows))
        input_ids = np.full((len(rows), width), self.pad_id_, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(mask)

    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise NotFittedError("FineTunedEncoder is not fitted; call fit(texts, labels) first")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings and load reports that say nothing actionable here."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
