"""Dataclass fields that declare their command-line flag, and the parser built from them.

A config field is written once: its name, type and default in the dataclass, its Megatron-LM flag
name in :func:`flag`, and its help as the docstring under it (the attribute docstring convention
that Sphinx and torchtitan's ``job_config.py`` use). :func:`add_flags` turns the fields of a
config class into argparse arguments, and :func:`flag_values` reads them back as the keyword
arguments of that class, so the parser, the config and ``--help`` cannot drift apart.

This module imports nothing from the project: every layer may declare flags with it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

_METADATA_KEY = "cli_flag"


class FlagDeclarationError(TypeError):
    """A config class declares a flag that cannot work (a programming error, not a user's)."""


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line."""

    name: str
    """The flag, e.g. ``--save-interval`` (Megatron-LM's name where it has one)."""
    choices: tuple[Any, ...] | None = None
    """The values accepted, if only some are."""
    parse: Callable[[str], Any] | None = None
    """Turns the command-line text into the field's value; default: the field's type."""
    metavar: str | None = None
    """Placeholder for the value in ``--help``."""
    required: bool = False
    """The command line must give it (fields without a default that nothing derives)."""
    derived: str | None = None
    """When the flag is not given, the value is derived from others (in ``trainer/arguments.py``);
    this says from what, for ``--help`` (e.g. ``"--seq-length"``). The command line then leaves
    the value as ``None``."""
    nargs: str | None = None
    """argparse's ``nargs`` for a field holding several values (a tuple): ``"+"`` takes one or more
    (Megatron-LM's ``--iterations-to-skip 10 11``)."""
    off: str | None = None
    """For a boolean field that defaults to False: a second flag that sets it False again
    (``--no-bias-gelu-fusion``), accepted for Megatron-LM command lines."""


def flag(name: str, default: Any = dataclasses.MISSING, **options: Any) -> Any:
    """A dataclass field whose command-line flag is ``name`` (see :class:`Flag` for ``options``).

    A boolean field is a switch: defaulting to False, ``name`` turns it on; defaulting to True,
    ``name`` must start with ``--no-`` and turns it off.
    """
    spec = Flag(name=name, **options)
    if not name.startswith("--"):
        raise FlagDeclarationError(f"flag {name!r} must start with '--'")
    return dataclasses.field(default=default, metadata={_METADATA_KEY: spec})


def flag_of(config_class: type, field_name: str) -> Flag:
    """The :class:`Flag` of a field (for error messages that name it)."""
    for f in dataclasses.fields(config_class):
        if f.name == field_name and _METADATA_KEY in f.metadata:
            return f.metadata[_METADATA_KEY]
    raise FlagDeclarationError(f"{config_class.__name__}.{field_name} declares no flag")


def flag_name(config: Any, field_name: str) -> str:
    """``--the-flag`` of ``field_name`` on a config object or class."""
    return flag_of(config if isinstance(config, type) else type(config), field_name).name


def flagged_fields(config_class: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of ``config_class`` that declare a flag, in declaration order."""
    return [(f, f.metadata[_METADATA_KEY]) for f in dataclasses.fields(config_class) if _METADATA_KEY in f.metadata]


def add_flags(group: argparse._ActionsContainer, config_class: type) -> None:
    """Add an argument to ``group`` for every flagged field of ``config_class``; its ``dest`` is the
    field's name, its help the field's docstring."""
    for f, spec in flagged_fields(config_class):
        _add_argument(group, config_class, f, spec)


def add_flag(group: argparse._ActionsContainer, config_class: type, field_name: str, **overrides: Any) -> None:
    """Add the one argument ``config_class.field_name`` declares, as the trainer has it (name,
    help, parsing), for a tool's command line (``rollback.sh``, ``convert_checkpoint.py``): the
    tools and the trainer then spell and explain a flag one way. ``overrides`` are argparse's
    keywords that differ for the tool (a ``default``, ``action="append"``)."""
    for f, spec in flagged_fields(config_class):
        if f.name == field_name:
            _add_argument(group, config_class, f, spec, **overrides)
            return
    raise FlagDeclarationError(f"{config_class.__name__}.{field_name} declares no flag")


def refuse_renamed(group: argparse._ActionsContainer, renamed: dict[str, str]) -> None:
    """Old spellings of a flag, each refused with its new name (``--local-dir`` ->
    ``--ckpt-local-dir``) rather than silently taken or reported as unknown."""

    class _Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is now {renamed[option_string]} (the trainer's name for it)")

    for old in renamed:
        group.add_argument(old, action=_Renamed, nargs="?", help=argparse.SUPPRESS)


def _add_argument(group: argparse._ActionsContainer, config_class: type, f: dataclasses.Field, spec: Flag,
                  **overrides: Any) -> None:
    help_text = _help(field_docstrings(config_class).get(f.name), f, spec, config_class)
    kwargs: dict[str, Any] = dict(dest=f.name, help=help_text)
    if _is_bool(f):
        # Not given, a derived switch is None, so that what it derives from (a preset) decides.
        given_default = None if spec.derived is not None else f.default
        if f.default is True:
            if not spec.name.startswith("--no-"):
                raise FlagDeclarationError(
                    f"{config_class.__name__}.{f.name} defaults to True: its flag must be a --no- switch, "
                    f"not {spec.name}")
            group.add_argument(spec.name, **{"action": "store_false", "default": given_default, **kwargs, **overrides})
        else:
            group.add_argument(spec.name, **{"action": "store_true", "default": given_default, **kwargs, **overrides})
        if spec.off:
            group.add_argument(spec.off, dest=f.name, action="store_false",
                               help=f"the default: {spec.name} off (accepted for Megatron-LM command lines)")
        return
    default = None if spec.derived is not None or f.default is dataclasses.MISSING else f.default
    kwargs.update(default=default, type=spec.parse or _scalar_type(f, config_class), required=spec.required)
    if spec.choices is not None:
        kwargs["choices"] = spec.choices
    if spec.nargs is not None:
        kwargs["nargs"] = spec.nargs
    # The value's placeholder in --help and usage follows the flag, not the field's name.
    if spec.metavar is not None or spec.choices is None:
        kwargs["metavar"] = spec.metavar or spec.name[2:].upper().replace("-", "_")
    kwargs.update(overrides)
    if "default" in overrides and overrides["default"] is not None and "(default: " not in kwargs["help"]:
        kwargs["help"] += f" (default: {overrides['default']})"
    group.add_argument(spec.name, **kwargs)


def flag_values(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The keyword arguments of ``config_class`` that the command line gave; a flag left out whose
    value is derived (or that has no default) is omitted, for the caller to supply."""
    values = {}
    for f, spec in flagged_fields(config_class):
        value = getattr(args, f.name)
        if value is None and (spec.derived is not None or f.default is dataclasses.MISSING):
            continue
        values[f.name] = value
    return values


def command_line(config_class: type, values: dict[str, Any], always: tuple[str, ...] = ()) -> list[str]:
    """The flags that give ``config_class`` these field ``values`` (the inverse of
    :func:`flag_values`): each value away from its field's default, and the fields in ``always``
    (or without a default) whatever their value; None is left out (a derived value not fixed)."""
    out: list[str] = []
    for f, spec in flagged_fields(config_class):
        if f.name not in values or values[f.name] is None:
            continue
        value = values[f.name]
        if f.name not in always and f.default is not dataclasses.MISSING and value == f.default:
            continue
        if _is_bool(f):
            if bool(value) != (f.default is True):  # the switch moves it off its default
                out.append(spec.name)
            elif spec.off:
                out.append(spec.off)
            continue
        out += [spec.name, *(map(str, value) if spec.nargs else [str(value)])]
    return out


@functools.lru_cache(maxsize=None)
def _class_bodies(module_name: str) -> dict[str, list[ast.stmt]]:
    """Each class body in a module's source, by qualified name. A module is parsed once: every
    start of ``pretrain_gpt.py`` builds its parser, and ``inspect.getsource`` of a class parses
    the class's whole module again for each class (~0.2 CPU-s a start, measured)."""
    bodies: dict[str, list[ast.stmt]] = {}

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, ast.ClassDef):
                bodies[prefix + node.name] = node.body
                visit(node.body, f"{prefix}{node.name}.")

    visit(ast.parse(inspect.getsource(sys.modules[module_name])).body, "")
    return bodies


def _class_body(klass: type) -> list[ast.stmt]:
    body = _class_bodies(klass.__module__).get(klass.__qualname__)
    if body is None:  # a class made in a function: its own source
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
    return body


@functools.lru_cache(maxsize=None)
def field_docstrings(config_class: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it in the class body)."""
    docs: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = _class_body(klass)
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _help(doc: str | None, f: dataclasses.Field, spec: Flag, config_class: type) -> str:
    if not doc:
        raise FlagDeclarationError(
            f"{config_class.__name__}.{f.name} ({spec.name}) has no docstring: it is the flag's --help")
    text = " ".join(doc.replace("``", "").split())
    has_default = f.default not in (dataclasses.MISSING, None, ())
    fallback = ("on" if f.default else "off") if _is_bool(f) else f.default
    if spec.derived is not None:
        text += f" (default: {spec.derived}, else {fallback})" if has_default else f" (default: {spec.derived})"
    elif has_default and not _is_bool(f):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")  # argparse formats help with %


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type in (bool, "bool")


_SCALARS = {"int": int, "float": float, "str": str}


def _scalar_type(f: dataclasses.Field, config_class: type) -> Callable[[str], Any]:
    """int, float or str from the field's annotation (``int | None`` is int)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    names = [part.strip() for part in re.split(r"\|", annotation) if part.strip() != "None"]
    if len(names) == 1 and names[0] in _SCALARS:
        return _SCALARS[names[0]]
    raise FlagDeclarationError(
        f"{config_class.__name__}.{f.name}: cannot parse a {annotation} from the command line; give parse=")
