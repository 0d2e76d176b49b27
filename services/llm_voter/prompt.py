"""The prompt: task and class descriptions from labels.yaml, one single-token answer word per class plus abstain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from flockwatch.common.labels import LabelConfig

PROMPT_VERSION = "v1"


class LabelWordError(ValueError):
    """An answer word is not exactly one token for the model's tokenizer."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the prompt needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Prompt:
    """Builds the chat messages for a text; `words[i]` answers `names[i]`, `abstain_word` answers "cannot tell"."""

    task: str
    description: str
    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    words: tuple[str, ...]
    abstain_word: str
    max_text_chars: int = 400
    version: str = PROMPT_VERSION

    @classmethod
    def from_labels(cls, labels: LabelConfig, words: list[str], abstain_word: str, max_text_chars: int = 400) -> Prompt:
        """A prompt for the classes of `labels.yaml`, answered by `words` (one per class, in order)."""
        if len(words) != len(labels.names):
            raise ValueError(f"{len(words)} answer words for {len(labels.names)} classes")
        return cls(
            task=labels.task,
            description=labels.description,
            names=tuple(labels.names),
            descriptions=tuple(label.description for label in labels.labels),
            words=tuple(words),
            abstain_word=abstain_word,
            max_text_chars=max_text_chars,
        )

    @property
    def all_words(self) -> tuple[str, ...]:
        """Every allowed answer: the class words, then the abstain word (the constrained choice)."""
        return (*self.words, self.abstain_word)

    def system(self) -> str:
        """The instructions, kept short (prompt length is the CPU cost): the task, one line per answer word."""
        lines = [self.description or self.task, "Answer with one word:"]
        lines += [f"{w}: {d or n}" for w, n, d in zip(self.words, self.names, self.descriptions, strict=True)]
        lines.append(f"{self.abstain_word}: cannot tell")
        return "\n".join(lines)

    def user(self, text: str) -> str:
        """The text, whitespace-collapsed and cut to `max_text_chars`."""
        clean = " ".join(text.split())
        if len(clean) > self.max_text_chars:
            clean = clean[: self.max_text_chars] + "…"
        return f"Text: {clean}"

    def messages(self, text: str) -> list[dict[str, str]]:
        """Chat messages for one text (the same for the transformers and the vLLM backend)."""
        return [{"role": "system", "content": self.system()}, {"role": "user", "content": self.user(text)}]

    def to_json(self) -> dict[str, Any]:
        """What llm.json records about the prompt."""
        return {
            "version": self.version,
            "task": self.task,
            "description": self.description,
            "names": list(self.names),
            "descriptions": list(self.descriptions),
            "words": list(self.words),
            "abstain_word": self.abstain_word,
            "max_text_chars": self.max_text_chars,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prompt:
        """The prompt recorded in llm.json."""
        if data.get("version") != PROMPT_VERSION:
            raise ValueError(f"prompt template version {data.get('version')!r}; this code builds {PROMPT_VERSION!r}")
        return cls(
            task=data["task"],
            description=data["description"],
            names=tuple(data["names"]),
            descriptions=tuple(data["descriptions"]),
            words=tuple(data["words"]),
            abstain_word=data["abstain_word"],
            max_text_chars=int(data["max_text_chars"]),
        )


def single_token_ids(tokenizer: Tokenizer, words: tuple[str, ...] | list[str]) -> list[int]:
    """The token id of each word; LabelWordError names every word that is not exactly one token."""
    ids: list[int] = []
    bad: list[str] = []
    for word in words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) == 1:
            ids.append(tokens[0])
        else:
            bad.append(f"{word!r} → {len(tokens)} tokens")
    if bad:
        raise LabelWordError(
            "answer words must be single tokens so one forward pass scores every class: "
            + "; ".join(bad)
            + " (set label_words in llm_lora.yaml)"
        )
    if len(set(ids)) != len(ids):
        raise LabelWordError(f"answer words {list(words)} share a token id")
    return ids
