"""API tokens: the CLI shows a token once and stores only its hash; scopes; token files checked and re-read."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from flockwatch.cli.main import app
from flockwatch.common.tokens import TokenEntry, TokenError, TokenStore, add_token, read_tokens
from typer.testing import CliRunner


def test_token_create_prints_the_token_once_and_stores_only_its_sha256(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    runner = CliRunner()
    created = runner.invoke(
        app, ["token", "create", "--file", str(path), "--name", "ci", "--scope", "predict", "--scope", "feedback"]
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("fw_") and len(token) == 46
    stored = path.read_text()
    assert token not in stored and hashlib.sha256(token.encode()).hexdigest() in stored
    assert path.stat().st_mode & 0o777 == 0o600
    listed = runner.invoke(app, ["token", "list", "--file", str(path)])
    assert listed.stdout.startswith("ci\tfeedback,predict\tdefault\t") and token not in listed.output
    (entry,) = read_tokens(path)
    assert entry.scopes == {"predict", "feedback"} and entry.rate_limit is None


def test_token_create_refuses_a_taken_name_an_unknown_scope_or_a_bad_rate(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    runner = CliRunner()
    base = ["token", "create", "--file", str(path), "--name"]
    assert runner.invoke(app, [*base, "a", "--scope", "admin"]).exit_code == 0
    taken = runner.invoke(app, [*base, "a", "--scope", "predict"])
    scope = runner.invoke(app, [*base, "b", "--scope", "root"])
    rate = runner.invoke(app, [*base, "c", "--scope", "predict", "--rate-limit", "lots"])
    assert (taken.exit_code, scope.exit_code, rate.exit_code) == (2, 2, 2)
    assert "'a' exists" in taken.output and "unknown scope(s) root" in scope.output and "'lots'" in rate.output
    assert [e.name for e in read_tokens(path)] == ["a"]


def test_token_revoke_removes_it_and_the_file_takes_new_tokens_after(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    add_token(path, "a", ["predict"])
    runner = CliRunner()
    assert runner.invoke(app, ["token", "revoke", "--file", str(path), "--name", "a"]).exit_code == 0
    assert read_tokens(path) == []
    assert runner.invoke(app, ["token", "revoke", "--file", str(path), "--name", "a"]).exit_code == 2
    add_token(path, "b", ["review"], rate_limit="10/second")
    assert [(e.name, e.rate_limit) for e in read_tokens(path)] == [("b", "10/second")]


def test_admin_holds_every_scope_and_review_includes_feedback() -> None:
    def entry(*scopes: str) -> TokenEntry:
        return TokenEntry.model_validate({"name": "t", "sha256": "0" * 64, "scopes": scopes})

    assert all(entry("admin").grants(s) for s in ("predict", "feedback", "review", "admin"))
    assert entry("review").grants("feedback") and not entry("review").grants("predict")
    assert not entry("feedback").grants("review") and not entry("predict").grants("admin")


def test_a_bad_token_file_names_the_entry_and_field(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- {name: a, sha256: " + "a" * 64 + ", scopes: [predict]}\n- {name: b, scopes: [predict]}\n")
    with pytest.raises(TokenError, match=r"tokens.yaml: entry 1.sha256: Field required"):
        read_tokens(path)
    path.write_text("- {name: a, sha256: " + "a" * 64 + ", scopes: [root]}\n")
    with pytest.raises(TokenError, match=r"entry 0.scopes"):
        read_tokens(path)
    path.write_text(("- {name: a, sha256: " + "a" * 64 + ", scopes: [predict]}\n") * 2)
    with pytest.raises(TokenError, match="must be unique; repeated: a"):
        read_tokens(path)


def test_the_store_keeps_its_tokens_when_the_file_turns_invalid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.yaml"
    token = add_token(path, "a", ["predict"])
    store = TokenStore(path, recheck_s=0)
    assert store.find(token) is not None and store.find(token + "x") is None
    path.write_text("- {name: [oops\n")
    with caplog.at_level(logging.ERROR):
        assert store.find(token) is not None
    assert "keeping the previous 1 tokens" in caplog.text
    other = add_token(tmp_path / "other.yaml", "b", ["admin"])
    path.write_text((tmp_path / "other.yaml").read_text())
    assert store.find(other) is not None and store.find(token) is None


def test_a_token_file_anyone_may_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    add_token(path, "a", ["admin"])
    path.chmod(0o644)  # readable by all is fine: it holds hashes of 256-bit tokens
    assert len(TokenStore(path)) == 1
    path.chmod(0o666)
    with pytest.raises(TokenError, match="every user may write it"):
        TokenStore(path)
