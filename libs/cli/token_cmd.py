"""`flockwatch token create|list|revoke`: API tokens; the file keeps only their sha256, the token is shown once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from flockwatch.common.tokens import SCOPES, TokenError, add_token, read_tokens, revoke_token

token_app = typer.Typer(no_args_is_help=True)
TokenFile = Annotated[
    Path,
    typer.Option(
        "--file", envvar="FLOCKWATCH_AUTH_TOKENS_FILE", help="The token file the services read (created if missing)"
    ),
]


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@token_app.command("create")
def create(
    file: TokenFile,
    name: Annotated[str, typer.Option(help="Who or what holds it (unique; shown in logs and metrics)")],
    scope: Annotated[list[str], typer.Option(help=f"Repeatable: {', '.join(SCOPES)} (admin: every scope)")],
    rate_limit: Annotated[
        str | None, typer.Option(help="This token's limit, e.g. 100/minute (default: FLOCKWATCH_RATE_LIMIT)")
    ] = None,
) -> None:
    """Create a token: print it once, store only its sha256 (the token cannot be shown again)."""
    unknown = sorted(set(scope) - set(SCOPES))
    if unknown:
        _fail(TokenError(f"unknown scope(s) {', '.join(unknown)}; choose from {', '.join(SCOPES)}"))
    try:
        token = add_token(file, name, [s for s in SCOPES if s in scope], rate_limit)
    except TokenError as exc:
        _fail(exc)
    typer.echo(token)
    typer.echo(
        f"token {name!r} ({', '.join(sorted(set(scope)))}) added to {file} as its sha256; keep it now, it is not "
        "stored anywhere. Services re-read the file within a second.",
        err=True,
    )


@token_app.command("list")
def list_tokens(file: TokenFile) -> None:
    """Names, scopes, rate limits and creation times (never the tokens, which are not stored)."""
    try:
        entries = read_tokens(file)
    except TokenError as exc:
        _fail(exc)
    for e in entries:
        created = e.created.isoformat(timespec="seconds") if e.created else "-"
        typer.echo(f"{e.name}\t{','.join(sorted(e.scopes))}\t{e.rate_limit or 'default'}\t{created}")


@token_app.command("revoke")
def revoke(file: TokenFile, name: Annotated[str, typer.Option(help="The token's name")]) -> None:
    """Remove a token; services refuse it within a second (they re-read the file when it changes)."""
    try:
        revoke_token(file, name)
    except TokenError as exc:
        _fail(exc)
    typer.echo(f"revoked {name!r} in {file}", err=True)
