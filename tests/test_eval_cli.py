"""`align eval` dispatch: the list of evaluations, a typo gets a suggestion, `align --help` stays light."""

from __future__ import annotations

import sys

from alignment.cli import main


def test_eval_help_lists_every_evaluation(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("truthfulqa", "toxigen", "winrate", "metrics", "train-classifier"):
        assert f"  {name}" in out


def test_unknown_evaluation_suggests_the_closest(capsys):
    assert main(["eval", "truthfulq"]) == 2
    assert "did you mean 'truthfulqa'?" in capsys.readouterr().err


def test_top_level_help_lists_eval_and_report_without_importing_torch(capsys):
    before = "torch" in sys.modules
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  eval " in out and "  report " in out
    assert before or "torch" not in sys.modules
