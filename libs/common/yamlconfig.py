"""Load user-edited YAML into pydantic models, with errors that name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is invalid; the message names file, line and field."""


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that remembers the line of every mapping key and sequence item."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    lines = {loader.construct_object(k, deep=True): k.start_mark.line + 1 for k, _ in node.value}
    return _LinedDict(mapping, lines, node.start_mark.line + 1)


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> list[Any]:
    return _LinedList(
        loader.construct_sequence(node, deep=True),
        [item.start_mark.line + 1 for item in node.value],
        node.start_mark.line + 1,
    )


class _LinedDict(dict[Any, Any]):
    def __init__(self, data: dict[Any, Any], lines: dict[Any, int], line: int) -> None:
        super().__init__(data)
        self.lines, self.line = lines, line


class _LinedList(list[Any]):
    def __init__(self, data: list[Any], lines: list[int], line: int) -> None:
        super().__init__(data)
        self.lines, self.line = lines, line


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def line_of(data: Any, loc: tuple[int | str, ...]) -> int | None:
    """The line of the deepest node of `loc` found in data loaded by `load_yaml`."""
    line: int | None = getattr(data, "line", None)
    node = data
    for part in loc:
        if isinstance(node, _LinedDict) and part in node:
            line, node = node.lines.get(part, line), node[part]
        elif isinstance(node, _LinedList) and isinstance(part, int) and 0 <= part < len(node):
            line, node = node.lines[part], node[part]
        else:
            break
    return line


def load_yaml(path: Path) -> Any:
    """Parse a YAML file, keeping line numbers; syntax errors become ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from exc
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc


def format_validation_error(path: Path, data: Any, exc: ValidationError) -> str:
    """One line per problem: `file:line: field.path: message`."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(data, loc)
        where = f"{path}:{line}" if line else str(path)
        lines.append(f"{where}: {field}: {err['msg']}")
    return "\n".join(lines)


def load_model(path: Path | str, model: type[M]) -> M:
    """Load and validate a YAML file into `model`, or raise ConfigError naming file, line and field."""
    path = Path(path)
    data = load_yaml(path)
    try:
        return model.model_validate(data, context={"path": path, "data": data})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, data, exc)) from exc
