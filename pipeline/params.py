"""How every parameter is parsed and validated: one mechanism, the schemas beside the code that reads them.

``params.yaml`` is grouped by dataset, then by stage (``mnist.train.epochs``), so that DVC can give each
stage exactly the keys it reads (``params: [mnist.train]``) and ``dvc exp run -S mnist.train.epochs=20``
reads naturally. Each stage declares its section as a frozen dataclass with a ``validate(key)`` method, in
its own module (a dataset's prepare section in ``pipeline/datasets/<name>.py``), so that a change to one
stage's schema reruns only that stage; this module holds what they share. A bad value stops the stage with
an error that names the key and says what is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.stage import StageError, dataset_name

PARAMS_FILE = Path("params.yaml")


class ParamError(StageError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ParamError(f"{key}: {message}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a (simple) type annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        if len(options) == 1:  # "X | None": report X's own, more precise error
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ParamError:
                pass
        _fail(key, f"expected {annotation}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return parse_section(annotation, value, key)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}")
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, f"expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug here, not in params.yaml


def parse_section(cls: type, raw: Any, key: str):
    if not isinstance(raw, dict):
        _fail(key, f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        _fail(f"{key}.{unknown[0]}", f"unknown parameter (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{key}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(f"{key}.{name}", "missing")
    section = cls(**values)
    section.validate(key)
    return section


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        _fail(key, message)


def _duplicate_key(node: yaml.Node, where: str = "", seen: set | None = None) -> str | None:
    """The first key that a mapping at any depth of ``node`` repeats, as ``line N: duplicate key a.b (first at
    line M)``; None if there is none. DVC refuses such a file, and a stage would silently take the last value.
    A merge (``<<: *base``) may be overridden: only keys written in the mapping itself count."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: the node was checked where its anchor is
        return None
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = [(f"{where}[{i}]", child) for i, child in enumerate(node.value)]
    elif isinstance(node, yaml.MappingNode):
        first: dict = {}
        children = []
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                continue
            name = f"{where}.{key.value}" if where else key.value
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first:
                return f"line {line}: duplicate key {name} (first at line {first[key.tag, key.value]})"
            first[key.tag, key.value] = line
            children.append((name, value))
    else:
        return None
    return next(filter(None, (_duplicate_key(child, name, seen) for name, child in children)), None)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What the YAML parser said, on one line: where, then what."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return " ".join(str(error).split())
    what = ", ".join(part for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def read_params_file(path: Path = PARAMS_FILE) -> dict:
    """params.yaml as DVC reads it: UTF-8 YAML without duplicate keys, a mapping, its ``datasets`` named by
    dataset names (pipeline/stage.py). Every stage reads it through here."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ParamError(f"{path}: not found (run the stages from the repository root)") from None
    except OSError as e:
        raise ParamError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ParamError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    loader = yaml.SafeLoader(text)
    loader.name = str(path)  # for the marks of its errors
    try:
        node = loader.get_single_node()
        if node is not None and (duplicate := _duplicate_key(node)):
            raise ParamError(f"{path}: {duplicate}")
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:  # the YAML parser recurses once per level
        raise ParamError(f"{path}: nested too deeply to be a params file") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: expected a mapping at the top level")
    if isinstance(raw.get("datasets"), dict):
        for name in raw["datasets"]:
            try:
                dataset_name(name, "datasets")
            except StageError as e:
                raise ParamError(f"{path}: {e}") from None
    return raw


STAGES = ("download", "prepare", "train", "evaluate", "render")  # the sections a dataset may have


def load_params(dataset: str, stage: str, schema: type, path: Path = PARAMS_FILE):
    """Parse ``<dataset>.<stage>`` of params.yaml into the dataclass ``schema`` and validate it.

    The dataset's section must be a mapping of stage sections: a misspelled stage (``evalute:``) is an error
    here, rather than a section that the stage silently never reads.
    """
    raw = read_params_file(path)
    section = raw.get(dataset)
    if not isinstance(section, dict):
        known = [k for k, v in raw.items() if isinstance(v, dict)]
        found = "no such section" if dataset not in raw else f"got {type(section).__name__} {section!r:.40}"
        raise ParamError(f"{path}: {dataset}: not a dataset section ({found}); datasets: {known}")
    unknown = sorted(set(section) - set(STAGES))
    if unknown:
        raise ParamError(f"{path}: {dataset}.{unknown[0]}: unknown stage section (stages: {', '.join(STAGES)})")
    try:
        values = section.get(stage)
        return parse_section(schema, {} if values is None else values, f"{dataset}.{stage}")
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None
