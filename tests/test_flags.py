"""Each flag is declared once, on its config field: the parser, the configs and the README agree."""

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.flags import FlagDeclarationError, add_flags, field_docstrings, flag, flag_values, flagged_fields
from tests.launch import ROOT
from trainer.arguments import ArgumentError, build_parser, parse_job_config

README = Path(ROOT) / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
# Flags of other commands that the README's training and checkpointing sections mention in
# spans that start with a flag: scripts/prepare_data.py's, checkpointing.host_pool's, torchrun's.
OTHER_COMMANDS = {"--shakespeare", "--train-tokenizer", "--input", "--list", "--remove", "--max-restarts"}
TRAINER_SECTIONS = ("## Training\n", "### On GPUs", "### Real text", "## Checkpointing", "### Fine-tuning",
                    "### Stall timelines")
BASE = ["--model-size", "tiny", "--mock-data", "--vocab-size", "1024", "--train-iters", "10", "--lr", "1e-3"]


def readme_trainer_flags(text: str) -> set[str]:
    """Flags the README shows for ``pretrain_gpt.py``: every flag after ``pretrain_gpt.py`` in a
    command (continuation lines joined), and inline spans that start with a flag in the training
    and checkpointing sections."""
    flags: set[str] = set()
    for command in text.replace("\\\n", " ").splitlines():
        if "pretrain_gpt.py " in command:
            flags.update(FLAG.findall(command.split("pretrain_gpt.py ", 1)[1].split("#")[0]))
    for section in re.split(r"\n(?=##+ )", text):
        if section.startswith(TRAINER_SECTIONS):
            for span in re.findall(r"`(--[^`]*)`", section):
                flags.update(FLAG.findall(span))
    return flags - OTHER_COMMANDS


def missing_from(parser: argparse.ArgumentParser, flags: set[str]) -> list[str]:
    return sorted(set(flags) - set(parser._option_string_actions))


def test_every_flag_the_readme_shows_exists():
    flags = readme_trainer_flags(README.read_text())
    assert len(flags) > 40  # the extraction found the documented flags, not nothing
    assert missing_from(build_parser(), flags) == []


def test_a_flag_removed_from_the_parser_is_caught():
    parser = build_parser()
    flags = readme_trainer_flags(README.read_text())
    del parser._option_string_actions["--ckpt-local-interval"]
    assert missing_from(parser, flags) == ["--ckpt-local-interval"]


def test_every_parser_flag_has_help():
    for action in build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_abbreviations_are_refused():
    with pytest.raises(ArgumentError, match="unrecognized arguments: --async"):
        parse_job_config(BASE + ["--save", "ckpt", "--async"], world_size=1)


def test_each_field_has_its_own_destination():
    """No two config fields share a command-line destination (``--seed`` lives in one config)."""
    dests = [a.dest for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    aliases = {"bias_gelu"}  # --no-bias-gelu-fusion sets the same field as --bias-gelu-fusion
    counts = {d: dests.count(d) for d in dests}
    assert {d for d, n in counts.items() if n > 1} == aliases


def test_defaults_come_from_the_config_fields():
    job = parse_job_config(BASE, world_size=1)
    assert job.lr.decay_style == "linear"  # Megatron-LM's default, written once
    for config in (job.checkpoint, job.optimizer, job.training.fusions):
        for f, spec in flagged_fields(type(config)):
            if spec.derived is None and f.default is not dataclasses.MISSING:
                assert getattr(config, f.name) == f.default, (type(config).__name__, f.name)


def test_flags_set_their_fields():
    job = parse_job_config(BASE + ["--save", "c", "--async-save", "--ckpt-host-versions", "3",
                                   "--no-bias-dropout-fusion", "--split", "8/1/1", "--seed", "7"], world_size=1)
    assert job.checkpoint.async_save and job.checkpoint.host_versions == 3
    assert job.training.fusions.bias_dropout is False
    assert job.data.split == (8.0, 1.0, 1.0)
    assert job.training.seed == 7


def test_help_is_the_field_docstring():
    @dataclass(frozen=True)
    class Example:
        rate: float = flag("--rate", 0.5)
        """How fast, in ``units``."""
        quiet: bool = flag("--no-noise", True)
        """Make noise; ``--no-noise`` keeps quiet."""

    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    assert field_docstrings(Example)["rate"] == "How fast, in ``units``."
    assert parser._option_string_actions["--rate"].help == "How fast, in units. (default: 0.5)"
    assert flag_values(parser.parse_args(["--no-noise"]), Example) == {"rate": 0.5, "quiet": False}


def test_a_field_without_docstring_or_with_a_wrong_switch_is_a_declaration_error():
    @dataclass(frozen=True)
    class Undocumented:
        rate: float = flag("--rate", 0.5)

    @dataclass(frozen=True)
    class WrongSwitch:
        on: bool = flag("--on", True)
        """True by default, so its flag must turn it off."""

    for config in (Undocumented, WrongSwitch):
        with pytest.raises(FlagDeclarationError):
            add_flags(argparse.ArgumentParser(), config)
