"""Tests of the lensminer command line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lensminer.cli import _parse_sets, app

runner = CliRunner()


def test_help_lists_stages():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "download", "pretrain", "embed", "score", "index", "similar", "demo"):
        assert command in result.output


def test_set_values_parsed_as_yaml():
    assert _parse_sets(["pretrain.epochs=5", "survey.layer=ls-dr10", "embed.device=cpu"]) == {
        "pretrain.epochs": 5,
        "survey.layer": "ls-dr10",
        "embed.device": "cpu",
    }


def test_set_without_equals_rejected():
    import typer

    with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
        _parse_sets(["pretrain.epochs"])


def test_similar_needs_one_query():
    result = runner.invoke(app, ["similar", "--run-dir", "runs/none"])
    assert result.exit_code != 0
    assert "--row" in result.output


def test_download_needs_targets(tmp_path):
    result = runner.invoke(app, ["download", "--run-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "--targets" in result.output
