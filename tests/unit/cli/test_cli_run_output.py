"""`loraplane run`'s output: the libraries' noise is gone (bitsandbytes' optional-kernel WARNING, peft's
"Could not find a config file" UserWarnings, transformers' "Loading weights" bar) without hiding other warnings,
and the trainer's evaluation lines are shown once (the run prints the evaluation itself) while its log keeps
every line."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest


@pytest.fixture
def quiet():
    from loraplane.trainer import cli

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    before = list(logger.filters)
    with warnings.catch_warnings():
        cli.quiet_library_noise()
        yield
    logger.filters[:] = before
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()


def test_the_trainer_silences_exactly_the_known_library_noise(quiet, caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        from loraplane.trainer.cli import quiet_library_noise

        quiet_library_noise()
        for text in ("Could not find a config file in loraplane/tiny-llama - will assume that the vocabulary was "
                     "not modified.", "another peft warning"):
            warnings.warn_explicit(text, UserWarning, "save_and_load.py", 313, module="peft.utils.save_and_load")
    assert [str(w.message) for w in seen] == ["another peft warning"]
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()


def test_the_run_shows_the_trainers_evaluation_once_and_logs_every_line(tmp_path, capfd):
    from loraplane.local.pipeline import trainer_line_shown_later
    from loraplane.local.processes import ManagedProcess

    script = ("import sys\n"
              "sys.stdout.write('train 1/2\\rtrain 2/2\\r\\n')\n"
              "sys.stdout.write('2026-12-06 20:41:33,349 INFO loraplane.trainer: evaluation (0.2 s): rouge_l: 1\\n')\n"
              "sys.stdout.write('adapter: /x\\nevaluation: rouge_l: adapter 1\\nERROR real problem\\n')\n"
              "sys.stdout.write('no newline at the end')\n")
    proc = ManagedProcess("trainer", [sys.executable, "-c", script], {}, tmp_path / "trainer.log")
    assert proc.run_foreground(hide=trainer_line_shown_later) == 0
    shown = capfd.readouterr().err
    assert "evaluation" not in shown, shown
    assert "train 1/2\rtrain 2/2\r" in shown and "adapter: /x\n" in shown and "ERROR real problem" in shown
    assert shown.endswith("no newline at the end")
    logged = (tmp_path / "trainer.log").read_text()
    assert logged.count("evaluation") == 2 and "ERROR real problem" in logged


def test_a_failed_trainer_is_said_once_in_words_not_as_json(tmp_path, capfd):
    """A dataset with a bad line: the run's error said the trainer's termination JSON verbatim, after the trainer's
    own JSON line had been shown too; now its reason and message in words, the JSON line only in the log."""
    from loraplane.local.pipeline import trainer_failure, trainer_line_shown_later
    from loraplane.local.processes import ManagedProcess

    term = '{"reason":"InvalidDataset","message":"dataset path: d.jsonl has 1 line(s) that are not JSON (line 6)"}'
    assert trainer_failure(term, 65) == ("InvalidDataset (exit 65): dataset path: d.jsonl has 1 line(s) that are not "
                                         "JSON (line 6)")
    assert trainer_failure("Traceback: boom\n", 1) == "(exit 1): Traceback: boom"
    script = ("import sys\n"
              "sys.stdout.write('2026-12-07 ERROR loraplane.trainer: InvalidDataset: bad line 6\\n')\n"
              "sys.stdout.write('{\"reason\": \"InvalidDataset\", \"message\": \"bad line 6\"}\\n')\n")
    proc = ManagedProcess("trainer", [sys.executable, "-c", script], {}, tmp_path / "trainer.log")
    assert proc.run_foreground(hide=trainer_line_shown_later) == 0
    shown = capfd.readouterr().err
    assert "ERROR loraplane.trainer: InvalidDataset" in shown and '{"reason"' not in shown, shown
    assert '{"reason": "InvalidDataset"' in (tmp_path / "trainer.log").read_text()
