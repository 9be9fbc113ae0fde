"""One short message per command-line or config mistake, instead of jsonargparse's usage dump and union-type report.

jsonargparse reports a bad ``--model.init_args.lrr 0.1`` as a nested tree ("Parser key "model": Does not validate
against any of the Union subtypes ... Problem with given class_path '...': Option 'lrr' is not accepted"). This
module walks that tree down to the one failing leaf and says which key was wrong, what was expected, and the closest
valid keys or values (``difflib``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass

_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_NOT_EXPECTED_KEY = re.compile(r"(?:does not accept option|Key) '([^']+)'(?: is not expected)?")
_EXPECTED = re.compile(r"Expected an? (.+?)\. Got value: (.*)$", re.M)
_EXPECTED_UNION = re.compile(r"^\s*- Expected an? <class '(\w+)'>", re.M)
_GIVEN_VALUE = re.compile(r"^\s*Given value: (.*)$", re.M)
_LITERAL = re.compile(r"typing\.Literal\[(.*)\]")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)$", re.M)
_CONFIG_PROBLEM = re.compile(r"Problems parsing config: (.*)", re.S)
_CALLABLE = re.compile(r"Type typing\.Callable.*? expects a function or a callable class:\s*")
_CALLABLE_CLASS = re.compile(r"Got value: Namespace\(class_path='([^']+)'")
_NO_CLASS = re.compile(r"(No module named '[^']+'|module '[^']+' has no attribute '[^']+')")


class CLIUsageError(ValueError):
    """A mistake in the command line or a config file; the message names the key and the fix."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` closest ``choices`` to ``word`` (difflib, cutoff 0.6)."""
    return difflib.get_close_matches(word, sorted(set(choices)), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean `lr`?)"`` when a close choice exists, else ``""``."""
    near = closest(word, choices)
    return f" (did you mean {' or '.join(f'`{c}`' for c in near)}?)" if near else ""


def init_parameters(class_path: str) -> list[str]:
    """The ``__init__`` parameters of ``class_path`` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@dataclass
class _Leaf:
    """The innermost failure of a jsonargparse error tree."""

    key: str
    """Dotted key, as on the command line without ``--`` (e.g. ``model.init_args.lr``)."""
    class_path: str | None
    text: str
    """The leaf's own text (e.g. ``Option 'lrr' is not accepted``)."""


def _meaningful_entries(block: str) -> str:
    """In an ``Errors:`` list, the first entry that is not the ``NoneType`` alternative of an Optional."""
    entries = re.split(r"\n\s*- ", "\n" + block)
    useful = [e for e in entries if e.strip() and not e.strip().startswith("Expected a <class 'NoneType'>")]
    return useful[0] if useful else block


def _walk(message: str) -> _Leaf:
    key_parts: list[str] = []
    class_path: str | None = None
    text = message
    while True:
        text = text.strip()
        key = _PARSER_KEY.match(text)
        if key:
            key_parts.append(key.group(1))
            text = text[key.end() :].strip()
            if text.startswith("Does not validate") and "Problem with given class_path" in text:
                text = _meaningful_entries(text.split("Errors:", 1)[1].split("\n  Given value type:")[0])
            continue
        callable_arg = _CALLABLE.match(text)
        if callable_arg:  # an optimizer / scheduler given as a class_path (OptimizerCallable, LRSchedulerCallable)
            named = _CALLABLE_CLASS.search(text) or _CALLABLE_CLASS.search(message)
            class_path = named.group(1) if named else class_path
            key_parts.append("init_args")
            text = re.sub(r"\.? Got value: Namespace\(class_path=.*$", "", text[callable_arg.end() :], flags=re.S)
            continue
        cls = _CLASS_PATH.match(text)
        if cls:
            class_path = cls.group(1)
            key_parts.append("init_args")
            text = text[cls.end() :]
            continue
        break
    if not text.strip() and key_parts:  # the leaf was cut off by an enclosing error list: read it from the message
        tail = message.rsplit(f'Parser key "{key_parts[-1]}":', 1)[-1]
        text = re.sub(r"\.? Got value: Namespace\(.*$", "", tail, flags=re.S)
    return _Leaf(".".join(key_parts), class_path, text.strip())


def explain(message: str, options: Iterable[str] = ()) -> str:
    """One short message for a jsonargparse parse error ``message``; ``options``: the valid ``--keys``."""
    options = list(options)
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        args = unrecognized.group(1).split()
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
        if not flags:
            return f"unexpected argument(s) {' '.join(args)}: options are given as `--key value` (see `--help`)"
        flag = flags[0]
        return f"`{flag}` is not an option{did_you_mean(flag, options)}; `--help` lists them all"
    config = _CONFIG_PROBLEM.search(message)
    if config:
        first = " ".join(line.strip() for line in config.group(1).strip().splitlines()[:4])
        return f"the config file is not valid YAML: {first}"
    unexpected = _NOT_EXPECTED_KEY.search(message)
    if unexpected and "Parser key" not in message:
        key = unexpected.group(1)
        plain = [o.lstrip("-") for o in options]
        return f"config key `{key}` is not accepted{did_you_mean(key, plain)}; `--help` lists the valid keys"
    leaf = _walk(message)
    return _explain_leaf(leaf, message)


def _explain_leaf(leaf: _Leaf, message: str) -> str:
    where = f"`{leaf.key}`" if leaf.key else "a value"
    owner = f" of {leaf.class_path}" if leaf.class_path else ""
    not_accepted = _NOT_ACCEPTED.search(leaf.text)
    if not_accepted:
        name = not_accepted.group(1)
        params = init_parameters(leaf.class_path) if leaf.class_path else []
        key = f"{leaf.key}.{name}" if leaf.key else name
        hint = did_you_mean(name, params)
        valid = f"; valid keys: {', '.join(params)}" if params and not hint else ""
        return f"`{key}` is not a parameter{owner}{hint}{valid}"
    expected = _EXPECTED.search(leaf.text)
    if expected:
        wanted, got = expected.group(1), expected.group(2).strip()
        literal = _LITERAL.search(wanted)
        if literal:
            values = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
            return f"{where}{owner} must be one of {', '.join(values)}; got {got!r}{did_you_mean(got, values)}"
        return f"{where}{owner} must be {_type_name(wanted)}; got {got!r}"
    missing_class = _NO_CLASS.search(leaf.text)
    if missing_class:
        named = _CLASS_PATH.search(message)
        name = leaf.class_path or (named.group(1) if named else "?")
        where = f"`{leaf.key.removesuffix('.init_args')}`" if leaf.key else "a class_path"
        return (
            f"{where}: cannot import {name!r} ({missing_class.group(1)}); give a full class_path such as "
            "`dplit.tasks.ClassificationTask`, or the path of a YAML file that exists"
        )
    union = _EXPECTED_UNION.findall(leaf.text)
    if union:
        given = _GIVEN_VALUE.search(leaf.text)
        types = [t for t in union if t != "NoneType"]
        optional = " or null" if "NoneType" in union else ""
        got = f"; got {given.group(1).strip()!r}" if given else ""
        if types:
            return f"{where} must be {' or '.join(_type_name(t) for t in types)}{optional}{got}"
    if "typing.Callable" in message or leaf.key.rsplit(".", 1)[-1] in ("optimizer", "lr_scheduler"):
        return (
            f"{where}{owner} must be a class, given as `{{class_path: torch.optim.SGD, init_args: {{lr: 0.1}}}}` "
            "(any torch.optim optimizer or torch.optim.lr_scheduler scheduler)"
        )
    if union:
        return f"{where}{owner}: {leaf.text.strip().splitlines()[0]}"
    lines = [line.strip() for line in leaf.text.splitlines() if line.strip()]
    return f"{where}{owner}: {lines[0] if lines else message.strip().splitlines()[0]}"


def _type_name(text: str) -> str:
    match = re.fullmatch(r"<class '([\w.]+)'>", text.strip())
    name = match.group(1) if match else text.strip()
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(name, name)


__all__ = ["CLIUsageError", "closest", "did_you_mean", "explain", "init_parameters"]
