"""ONNX Runtime as the serving backend of a fine-tuned encoder (`FLOCKWATCH_EMBEDDING_BACKEND=onnxruntime`).

The loaded network is exported to ONNX once at load time and, with int8 on, its MatMul weights quantized
dynamically; tokenizing, length sorting and forward-pass sizes stay the torch model's. Measured here
(`benchmarks/results/encoder.json`, 1 thread): SMS 6.1 vs 8.5 CPU-ms per text for torch's dynamic int8 at
the same macro-F1. Needs `onnxruntime` and `onnx` (the quantizer), which the project does not require.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flockwatch.classical_voter.finetune import FineTunedEncoder, quiet
from numpy.typing import NDArray

OPSET = 17


class OnnxLogits:
    """A fitted (not quantized) FineTunedEncoder's logits computed by ONNX Runtime."""

    def __init__(self, model: FineTunedEncoder, quantize: bool = True, threads: int | None = None) -> None:
        try:
            import onnxruntime  # noqa: F401 - a clear error before any export work
        except ImportError as exc:
            raise RuntimeError("the onnxruntime backend needs `pip install onnxruntime onnx`") from exc
        if getattr(model, "quantized_", False):
            raise ValueError("export the fp32 model: ONNX Runtime quantizes it itself")
        self.model = model
        with tempfile.TemporaryDirectory() as tmp:
            self.session = onnx_session(export(model, Path(tmp) / "encoder.onnx", quantize), threads)

    def predict_logits(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """(n, k) logits in `texts` order: length-sorted forward passes of the model's `infer_batch_size`."""
        return session_logits(self.model, self.session, texts)


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on the file at `path` (threads None: one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (one per core)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_logits(model: FineTunedEncoder, session: Any, texts: Sequence[str]) -> NDArray[np.float32]:
    """(n, k) logits of an exported `model` run by `session`, tokenized and batched as the torch model does."""
    out = np.empty((len(texts), len(model.classes_)), dtype=np.float32)
    if not len(texts):
        return out
    ids = model._tokenize(texts)
    order = np.argsort([len(row) for row in ids], kind="stable")
    for start in range(0, len(order), model.infer_batch_size):
        batch = order[start : start + model.infer_batch_size]
        input_ids, mask = model._pad(ids, batch)
        out[batch] = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})[0]
    return out


def export(model: FineTunedEncoder, path: Path, quantize: bool) -> Path:
    """Write the network as ONNX (dynamic batch and length axes); with `quantize`, its int8 version; the path."""
    ids, mask = model._pad(model._tokenize(["a short text", "and another one"]), np.arange(2))
    axes: dict[str, Any] = {"input_ids": {0: "n", 1: "len"}, "attention_mask": {0: "n", 1: "len"}, "logits": {0: "n"}}
    with quiet(), torch.no_grad():
        torch.onnx.export(
            model.net_,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, and dynamic axes as declared
        )
    if not quantize:
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = path.with_suffix(".int8.onnx")
    with quiet():
        quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
    return int8
