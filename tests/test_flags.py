"""Each flag is declared once, on its config field: the parser, the configs and the docs agree."""

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.flags import FlagDeclarationError, add_flags, field_docstrings, flag, flag_values, flagged_fields
from tests.launch import ROOT
from trainer.arguments import ArgumentError, build_parser, parse_job_config

DOCS = (Path(ROOT) / "README.md", *sorted((Path(ROOT) / "docs").glob("*.md")))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
HEADING = re.compile(r"#+ (.*)")
# Flags of other commands that the docs' training and checkpointing sections mention in
# spans that start with a flag: scripts/prepare_data.py's, checkpointing.storage.host_pool's, torchrun's.
OTHER_COMMANDS = {"--shakespeare", "--train-tokenizer", "--input", "--list", "--remove", "--max-restarts"}
# The titles of the headings (any level) whose sections document the trainer's flags, in
# docs/training.md and docs/checkpointing.md.
TRAINER_SECTIONS = {"Training", "On GPUs", "Real text", "Checkpointing", "Fine-tuning and layout changes",
                    "The asynchronous engine", "Stock readers and restarts", "Stall timelines"}
BASE = ["--model-size", "tiny", "--mock-data", "--vocab-size", "1024", "--train-iters", "10", "--lr", "1e-3"]


def docs_text() -> str:
    """README.md and every page of docs/, one after the other."""
    return "\n\n".join(page.read_text() for page in DOCS)


def sections(text: str) -> list[tuple[str, str]]:
    """(heading title, text) of each section: one starts at a markdown heading of any level outside
    a code block (a ``# comment`` in a bash block starts none)."""
    found: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else HEADING.fullmatch(line)
        if heading:
            found.append((heading.group(1).strip(), []))
        found[-1][1].append(line)
    return [(title, "\n".join(lines)) for title, lines in found]


def documented_trainer_flags(text: str) -> set[str]:
    """Flags the docs show for ``pretrain_gpt.py``: every flag after ``pretrain_gpt.py`` in a
    command (continuation lines joined), and inline spans that start with a flag in the training
    and checkpointing sections."""
    flags: set[str] = set()
    for command in text.replace("\\\n", " ").splitlines():
        if "pretrain_gpt.py " in command:
            flags.update(FLAG.findall(command.split("pretrain_gpt.py ", 1)[1].split("#")[0]))
    for title, section in sections(text):
        if title in TRAINER_SECTIONS:
            for span in re.findall(r"`(--[^`]*)`", section):
                flags.update(FLAG.findall(span))
    return flags - OTHER_COMMANDS


def missing_from(parser: argparse.ArgumentParser, flags: set[str]) -> list[str]:
    return sorted(set(flags) - set(parser._option_string_actions))


def test_every_flag_the_docs_show_exists():
    flags = documented_trainer_flags(docs_text())
    assert len(flags) > 40  # the extraction found the documented flags, not nothing
    assert missing_from(build_parser(), flags) == []


def test_a_flag_removed_from_the_parser_is_caught():
    parser = build_parser()
    flags = documented_trainer_flags(docs_text())
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


def test_tools_declare_no_checkpoint_flag_by_hand():
    """``rollback.sh``, ``host_pool``, ``convert_checkpoint.py``, ``ckpt_history.py`` and the
    benches take the checkpoint flags from ``CheckpointConfig`` (``cli.flags.add_flag``): one
    name and one help for each, everywhere."""
    from checkpointing.base import CheckpointConfig
    from cli.flags import flagged_fields

    names = {spec.name for _, spec in flagged_fields(CheckpointConfig)}
    by_hand = {}
    for path in [*Path(ROOT).glob("scripts/*.py"), *Path(ROOT).glob("checkpointing/**/*.py"),
                 *Path(ROOT).glob("interop/*.py"), *Path(ROOT).glob("benchmarks/*.py")]:
        for name in re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", path.read_text()):
            if name in names:
                by_hand.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert by_hand == {}


def test_old_spellings_are_refused_with_the_new_name(capsys):
    from checkpointing.recovery import rollback

    for old, new in (("--local-dir", "--ckpt-local-dir"), ("--host-dir", "--ckpt-host-dir")):
        with pytest.raises(SystemExit) as exit_:
            rollback.main(["20", "--save", "ckpt", old, "/x"])
        assert exit_.value.code == 2
        assert f"{old} is now {new}" in capsys.readouterr().err



def test_docstrings_from_each_modules_one_parse_are_each_classs_own(monkeypatch):
    """``field_docstrings`` parses a module once for all its classes (``inspect.getsource`` of a
    class parses its whole module each time): the body it finds is each class's own, for every
    config class the trainer's parser reads."""
    import ast
    import inspect
    import textwrap

    from cli import flags
    from trainer.arguments import build_parser

    read = []
    real = flags.field_docstrings
    monkeypatch.setattr(flags, "field_docstrings", lambda cls: read.append(cls) or real(cls))
    build_parser()
    classes = {klass for cls in read for klass in cls.__mro__ if dataclasses.is_dataclass(klass)}
    assert len(classes) >= 8, classes
    for cls in classes:
        own = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        assert ast.dump(ast.Module(flags._class_body(cls), [])) == ast.dump(ast.Module(own, [])), cls
