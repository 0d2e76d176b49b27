"""Cross-fitting the fine-tuned encoder: K stratified fold models give out-of-fold logits for every train text,
a temperature is fitted on them, and a final model is trained on every train text.

The fold models and the final model are independent, so they can run side by side: in spawned processes
with one torch thread each (never forked: a forked child shares the parent's signal handlers and locks).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flockwatch.classical_voter.finetune import FinetuneConfig, FineTunedEncoder
from flockwatch.classical_voter.model import TrainingDataError, check_training
from numpy.typing import NDArray
from sklearn.model_selection import StratifiedKFold

FINAL = -1  # the task id of the final model (fold tasks are 0 … K-1)


@dataclass
class CrossFit:
    """Out-of-fold logits (fold of each row in `fold_of`), the temperature fitted on them, the final model."""

    classes: list[str]
    fold_of: NDArray[np.int64]
    oof_logits: NDArray[np.float32]
    temperature: float
    final: FineTunedEncoder
    seconds: dict[str, float] = field(default_factory=dict)
    workers: int = 1


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container may narrow), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fold_assignment(labels: Sequence[str], folds: int, seed: int) -> NDArray[np.int64]:
    """The stratified fold (0 … folds-1) in which each row is held out."""
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    y = np.asarray(labels, dtype=object)
    for fold, (_, held_out) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y)):
        fold_of[held_out] = fold
    return fold_of


def fit_task(
    config: FinetuneConfig,
    encoder: Path | None,
    texts: Sequence[str],
    labels: Sequence[str],
    held_out: Sequence[str],
    epochs: int,
    threads: int | None,
) -> tuple[FineTunedEncoder | None, NDArray[np.float32], float]:
    """Fit one model; a fold model returns its logits on `held_out` (as served: rounded, maybe quantized),
    the final model (no `held_out`) returns itself, rounded to the stored dtype."""
    model = config.estimator(epochs=epochs, threads=threads, encoder=encoder).fit(texts, labels)
    model.round_weights(config.dtype)
    if not held_out:
        return model, np.empty((0, len(model.classes_)), dtype=np.float32), model.fit_seconds_
    if config.quantize:
        model.quantize()
    return None, model.predict_logits(held_out), model.fit_seconds_


def cross_fit(
    config: FinetuneConfig,
    texts: Sequence[str],
    labels: Sequence[str],
    encoder: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> CrossFit:
    """K fold models and the final model (side by side when `config.parallel`); temperature on the pooled OOF."""
    check_training(texts, labels, min_per_class=config.folds)
    classes = sorted(set(labels))
    fold_of = fold_assignment(labels, config.folds, config.seed)
    text_arr, label_arr = np.asarray(texts, dtype=object), np.asarray(labels, dtype=object)
    fold_epochs = config.fold_epochs or config.epochs
    # the final model first: it is the longest task, so the folds fill the other worker around it
    tasks: dict[int, tuple[Any, ...]] = {FINAL: (list(texts), list(labels), [], config.epochs)}
    for fold in range(config.folds):
        train, held = fold_of != fold, fold_of == fold
        tasks[fold] = (text_arr[train].tolist(), label_arr[train].tolist(), text_arr[held].tolist(), fold_epochs)
    workers = min(usable_cpus(), len(tasks)) if config.parallel else 1
    start = time.perf_counter()
    results = _run(config, encoder, tasks, workers, progress)
    oof = np.full((len(texts), len(classes)), np.nan, dtype=np.float32)
    seconds: dict[str, float] = {}
    final: FineTunedEncoder | None = None
    for task, (model, logits, fit_seconds) in sorted(results.items()):
        if task == FINAL:
            final, seconds["final"] = model, round(fit_seconds, 1)
        else:
            oof[fold_of == task] = logits
            seconds[f"fold_{task}"] = round(fit_seconds, 1)
    assert final is not None  # the FINAL task always returns its model
    if final.classes_ != classes:
        raise TrainingDataError(f"the final model's classes {final.classes_} differ from the data's {classes}")
    final.calibrate(oof, labels)  # one temperature for every row: fitted on the pooled out-of-fold logits
    seconds["total"] = round(time.perf_counter() - start, 1)
    return CrossFit(classes, fold_of, oof, final.temperature_, final, seconds, workers)


def _run(
    config: FinetuneConfig,
    encoder: Path | None,
    tasks: dict[int, tuple[Any, ...]],
    workers: int,
    progress: Callable[[str], None],
) -> dict[int, tuple[FineTunedEncoder | None, NDArray[np.float32], float]]:
    """Every task's result: in this process one after another, or in `workers` spawned one-thread processes."""

    def name(task: int) -> str:
        return "final model" if task == FINAL else f"fold {task + 1}/{config.folds}"

    results = {}
    if workers <= 1:
        for task, (texts, labels, held, epochs) in tasks.items():
            progress(f"fine-tuning {name(task)}: {len(texts)} texts, {epochs} epochs")
            results[task] = fit_task(config, encoder, texts, labels, held, epochs, config.threads)
        return results
    progress(f"fine-tuning the final model and {config.folds} fold models in {workers} processes")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures: dict[Future[Any], int] = {
            pool.submit(fit_task, config, encoder, texts, labels, held, epochs, 1): task
            for task, (texts, labels, held, epochs) in tasks.items()
        }
        for future, task in futures.items():
            results[task] = future.result()
            progress(f"fine-tuned {name(task)} in {results[task][2]:.0f} s")
    return results
