"""`flockwatch rules test`: which rules fire on a text, why, and what the regex voter would say."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from flockwatch.common.labels import LabelConfig
from flockwatch.common.voting import Opinion
from flockwatch.common.yamlconfig import ConfigError, load_model
from flockwatch.regex_voter.model import RuleEngine, RuleTrace
from flockwatch.regex_voter.rules import RuleSet, load_rules
from rich.console import Console
from rich.table import Table
from rich.text import Text

rules_app = typer.Typer(help="Check and explain regex rule files.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


@rules_app.callback()
def _group() -> None:
    """Check and explain regex rule files."""


@rules_app.command("test")
def test_rules(
    rules_yaml: Annotated[Path, typer.Argument(help="The rules file")],
    text: Annotated[str, typer.Argument(help="The text to classify")],
    labels: Annotated[
        Path | None,
        typer.Option(help="labels.yaml of the task; without it, the labels the rules name, with equal harm"),
    ] = None,
) -> None:
    """Show which rules fire on TEXT and why, the winning rule, the probabilities and the safety triggers."""
    try:
        engine = _engine(rules_yaml, labels)
    except ConfigError as exc:
        errors.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        raise typer.Exit(2) from None
    traces = engine.explain(text)
    opinion = engine.predict([text])[0]
    for trace in traces:
        console.print(_trace_line(trace))
    _print_opinion(opinion)


def _engine(rules_yaml: Path, labels_yaml: Path | None) -> RuleEngine:
    if labels_yaml is not None:
        labels = LabelConfig.load(labels_yaml)
    else:
        ruleset = load_model(rules_yaml, RuleSet)
        names = ruleset.labels_used()
        if len(names) < 2:
            raise ConfigError(f"{rules_yaml}: the rules name fewer than two labels; pass --labels")
        labels = LabelConfig.from_names(ruleset.task or "rules", names)
    return RuleEngine(load_rules(rules_yaml, labels), labels)


def _trace_line(t: RuleTrace) -> Text:
    line = Text("fired " if t.fired else "  -   ", style="bold green" if t.fired else "dim")
    line.append(t.rule_id, style="bold" if t.fired else "")
    line.append(f" -> {t.label or '(no label)'}, priority {t.priority}: {t.reason}")
    if t.safety is not None:
        line.append(f"  [safety: {_safety(t.safety.min_label, t.safety.review)}]", style="red")
    return line


def _safety(min_label: str | None, review: bool) -> str:
    parts = ([f"at least {min_label}"] if min_label else []) + (["human review"] if review else [])
    return ", ".join(parts)


def _print_opinion(opinion: Opinion) -> None:
    if opinion.probabilities is None:
        console.print(Text.assemble(("abstains: ", "bold"), str(opinion.abstain_reason)))
    else:
        console.print(Text.assemble(("winner: ", "bold"), opinion.evidence[0]))
        probs = Table(title="probabilities")
        probs.add_column("label")
        probs.add_column("p", justify="right")
        for name, p in sorted(opinion.probabilities.items(), key=lambda kv: -kv[1]):
            probs.add_row(Text(name), f"{p:.3f}")
        console.print(probs)
    for s in opinion.safety:
        console.print(Text.assemble(("safety: ", "bold red"), f"{s.rule_id}: {_safety(s.min_label, s.review)}"))
    if not opinion.safety:
        console.print("safety: none")
