"""The fine-tuned `minilm` encoder: macro-F1 and CPU cost per text by backend, threads and batch; training time.

    python benchmarks/encoder.py --out benchmarks/results/encoder.json [--datasets trec sms] [--layers 6 3]
    python benchmarks/encoder.py --crossfit trec --out …   # also the trainer's whole cross-fit, timed

Data: data/{trec,sms}.csv (`make data`), a stratified 60/40 split (train_test_split, random_state=0). Per data
set and depth (transformer layers kept), a FineTunedEncoder is fine-tuned on the 60 % (2 torch threads; its
weights cached under --work so a rerun only measures) and scored on the 40 %:
- backends: torch fp32, torch fp32 with the weights rounded through fp16 (as stored), torch dynamic int8
  (Linear layers), ONNX Runtime fp32 and int8 (dynamic) when `onnxruntime` and `onnx` are installed;
- macro-F1 on the whole 40 % (1 thread, calls of 256 texts, forward passes of 32) and CPU-ms per text
  (process CPU time of the predict call, tokenizing included; each call sorted by length, then cut into
  forward passes) for each (threads, texts per call, texts per forward pass) of PLAN on 512 test texts, at
  max_length 64 and 32 (inference truncation; the models are trained at 64).
`--parallel-check N`: the same small cross-fit in spawned one-thread processes vs in-process with 2 threads.
`--crossfit NAME` runs the trainer's entry point (`train_embedding(..., finetune=FinetuneConfig(...))`) on the
60 % with each `--cv` plan, and scores its final model on the 40 %: wall time per fold and final, OOF quality.
The box's load average is recorded with every timing: CPU-ms grow when other processes share the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flockwatch.classical_voter.finetune import FinetuneConfig, FineTunedEncoder
from flockwatch.classical_voter.finetune_onnx import export, onnx_session, session_logits
from scipy.special import softmax
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
# (threads, texts per call, texts per forward pass); the first also gives macro-F1 on the whole test file
PLAN = ((1, 256, 32), (1, 256, 128), (1, 32, 32), (2, 256, 32), (2, 32, 32))
CV_PLANS = {  # name → FinetuneConfig fields; the trainer's default first
    "default": {},
    "fold_epochs_2": {"fold_epochs": 2},
    "two_folds": {"folds": 2},
    "sequential": {"parallel": False, "threads": 2},
}


def load_split(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stratified 60/40 split of data/<name>.csv (duplicates dropped)."""
    data = pd.read_csv(ROOT / "data" / f"{name}.csv").drop_duplicates("text")
    train, test = train_test_split(data, test_size=0.4, stratify=data["label"], random_state=0)
    return train, test


def macro_f1(classes: list[str], logits: np.ndarray, labels: pd.Series) -> float:
    """Macro-F1 of the logits' argmax."""
    return round(float(f1_score(labels, np.asarray(classes)[logits.argmax(axis=1)], average="macro")), 4)


def trained(name: str, layers: int, train: pd.DataFrame, work: Path) -> tuple[FineTunedEncoder, dict[str, Any]]:
    """The fine-tuned model for (data set, depth): loaded from --work, else fine-tuned (2 threads) and saved."""
    from safetensors.torch import load_file, save_file

    path = work / f"{name}-L{layers}.safetensors"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        model = FineTunedEncoder.from_state(load_file(str(path)), info, Path(info["folder"]))
        return model, info["train"]
    model = FineTunedEncoder(layers=None if layers == 6 else layers, threads=2)
    load, cpu = os.getloadavg()[0], time.process_time()
    model.fit(train["text"].tolist(), train["label"].tolist())
    report = {
        "n": len(train),
        "epochs": model.epochs,
        "wall_s": round(model.fit_seconds_, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "losses": [round(x, 4) for x in model.losses_],
    }
    work.mkdir(parents=True, exist_ok=True)
    save_file(model.state_tensors("float32"), str(path))
    params = {k: v for k, v in model.get_params().items() if k not in ("encoder", "threads")}
    info = {"params": params, "classes": model.classes_, "temperature": 1.0, "train": report}
    meta.write_text(json.dumps({**info, "folder": str(model._folder())}))
    return model, report


class OrtModel:
    """The fine-tuned network exported to ONNX and run by ONNX Runtime (the service's export and batching)."""

    def __init__(self, model: FineTunedEncoder, path: Path, int8: bool) -> None:
        self.model, self.path = model, export(model, path, int8)
        self.session: Any = None

    def threads(self, n: int) -> None:
        """A session with `n` intra-op threads."""
        self.session = onnx_session(self.path, n)

    def predict_logits(self, texts: list[str]) -> np.ndarray:
        """Logits in `texts` order, length-sorted forward passes of the torch model's batch size."""
        return session_logits(self.model, self.session, texts)


def timed(predict: Any, texts: list[str], batch: int) -> tuple[np.ndarray, float]:
    """Logits of every text in calls of `batch` texts, and the process CPU-ms per text."""
    predict(texts[:batch])  # warm-up: first-call allocations
    cpu = time.process_time()
    rows = [predict(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    return np.concatenate(rows), round((time.process_time() - cpu) * 1000 / len(texts), 3)


def backends(model: FineTunedEncoder, work: Path) -> dict[str, Any]:
    """name → a predict_logits callable plus its thread setter."""
    rounded = copy.deepcopy(model).round_weights("float16")
    out: dict[str, Any] = {
        "torch_fp32": model,
        "torch_fp16_weights": rounded,
        "torch_int8": copy.deepcopy(rounded).quantize(),
    }
    try:
        import onnx  # noqa: F401  (the exporter and the quantizer need it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return out
    out["onnxruntime_fp32"] = OrtModel(rounded, work / "model.onnx", int8=False)
    out["onnxruntime_int8"] = OrtModel(rounded, work / "model.onnx", int8=True)
    return out


def measure(name: str, layers: int, work: Path, timing_texts: int = 512) -> dict[str, Any]:
    """Fine-tune (or load) one model; per backend and max_length: macro-F1 on the whole test file (PLAN[0],
    timed too), then CPU-ms per text for the rest of PLAN on `timing_texts` texts."""
    train, test = load_split(name)
    model, report = trained(name, layers, train, work)
    model.threads = None  # set per measurement, process-wide: switching it on every call doubles the cost
    texts, labels = test["text"].tolist(), test["label"]
    subset = test.sample(min(timing_texts, len(test)), random_state=0)["text"].tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, predictor in backends(model, Path(tmp)).items():
            target = predictor.model if isinstance(predictor, OrtModel) else predictor
            for max_length in (64, 32):
                target.max_length = max_length
                for threads, batch, forward in PLAN:
                    torch.set_num_threads(threads)
                    if isinstance(predictor, OrtModel):
                        predictor.threads(threads)
                    target.infer_batch_size = forward
                    load = os.getloadavg()[0]
                    row: dict[str, Any] = {"backend": backend, "max_length": max_length, "threads": threads}
                    if (threads, batch, forward) == PLAN[0]:
                        logits, cpu_ms = timed(predictor.predict_logits, texts, batch)
                        row["macro_f1"] = macro_f1(model.classes_, logits, labels)
                    else:
                        cpu_ms = timed(predictor.predict_logits, subset, batch)[1]
                    row.update(batch=batch, forward=forward, cpu_ms_per_text=cpu_ms, load=round(load, 2))
                    rows.append(row)
                    print(name, f"L{layers}", rows[-1], flush=True)
    return {"data": name, "layers": layers, "n_train": len(train), "n_test": len(test), "train": report, "rows": rows}


def crossfit(name: str, plan: str, work: Path) -> dict[str, Any]:
    """The trainer's entry point on the 60 % with one plan; its final model scored on the 40 %."""
    from flockwatch.classical_voter.embedding_app import train_embedding
    from flockwatch.classical_voter.encoder import packaged_minilm

    train, test = load_split(name)
    config = FinetuneConfig(**CV_PLANS[plan])
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        fit = train_embedding(
            packaged_minilm(),
            (train["text"].tolist(), train["label"].tolist()),
            test["text"].tolist(),
            Path(out),
            finetune=config,
            progress=print,
        )
    test_f1 = macro_f1(fit.classes, np.log(fit.cal), test["label"])
    y = np.array([fit.classes.index(label) for label in test["label"]])
    probs = softmax(np.log(fit.cal), axis=1)
    nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    result = {"data": name, "plan": plan, "config": config.model_dump(), "load_before": round(load, 2)}
    result.update(report=fit.report, test_macro_f1=test_f1, test_nll=round(nll, 4))
    result["load_after"] = round(os.getloadavg()[0], 2)
    print(result, flush=True)
    return result


def parallel_check(name: str, n: int) -> dict[str, Any]:
    """Wall time of the same small cross-fit (1 epoch, 3 folds + final on `n` train texts): in spawned one-thread
    processes side by side, against one after another in this process with 2 threads."""
    from flockwatch.classical_voter.encoder import packaged_minilm
    from flockwatch.classical_voter.finetune_cv import cross_fit

    train, _ = load_split(name)
    train = train.iloc[:n]
    walls: dict[str, Any] = {}
    for plan, fields in {"parallel_1_thread": {}, "sequential_2_threads": {"parallel": False, "threads": 2}}.items():
        load, start = os.getloadavg()[0], time.perf_counter()
        fit = cross_fit(
            FinetuneConfig(epochs=1, **fields), train["text"].tolist(), train["label"].tolist(), packaged_minilm()
        )
        walls[plan] = {"wall_s": round(time.perf_counter() - start, 1), "fits": fit.seconds, "load": round(load, 2)}
        print(name, plan, walls[plan], flush=True)
    return {"data": name, "n": n, "epochs": 1, "folds": 3, **walls}


def summarize(models: dict[str, Any], tolerance: float = 0.005) -> dict[str, Any]:
    """Per model: each backend's macro-F1 and CPU-ms (PLAN[0], max_length 64), and the fastest
    backend whose macro-F1 is within `tolerance` of fp32's."""
    out: dict[str, Any] = {}
    for key, model in models.items():
        rows = [r for r in model["rows"] if "macro_f1" in r and r["max_length"] == 64]
        by_backend = {r["backend"]: {"macro_f1": r["macro_f1"], "cpu_ms_per_text": r["cpu_ms_per_text"]} for r in rows}
        reference = by_backend["torch_fp32"]["macro_f1"]
        equal = {b: v for b, v in by_backend.items() if v["macro_f1"] >= reference - tolerance}
        fastest = min(equal, key=lambda b: equal[b]["cpu_ms_per_text"])
        out[key] = {"backends": by_backend, "fastest_at_equal_f1": fastest, "train_wall_s": model["train"]["wall_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encoder.json")
    parser.add_argument("--datasets", nargs="*", default=["trec", "sms"])
    parser.add_argument("--layers", nargs="*", type=int, default=[6, 3])
    parser.add_argument("--crossfit", nargs="*", default=[], help="data sets to run the trainer's cross-fit on")
    parser.add_argument("--cv", nargs="*", default=list(CV_PLANS), choices=list(CV_PLANS))
    parser.add_argument(
        "--parallel-check", type=int, default=0, help="train texts for the parallel-vs-sequential check"
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-encoder")
    args = parser.parse_args()
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    for name in args.datasets:
        for layers in args.layers:
            result.setdefault("models", {})[f"{name}-L{layers}"] = measure(name, layers, args.work)
            args.out.write_text(json.dumps(result, indent=1))  # after each model: a long run keeps what it has
    if result.get("models"):
        result["summary"] = summarize(result["models"])
        args.out.write_text(json.dumps(result, indent=1))
    if args.parallel_check:
        result["parallel_check"] = parallel_check(args.datasets[0], args.parallel_check)
        args.out.write_text(json.dumps(result, indent=1))
    for name in args.crossfit:
        for plan in args.cv:
            result.setdefault("crossfit", {})[f"{name}-{plan}"] = crossfit(name, plan, args.work)
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
