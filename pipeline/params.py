"""How every parameter is parsed and validated: ``<dataset>.<stage>`` sections of params.yaml, each declared as a
frozen dataclass with a ``validate(key)`` method beside the code that reads it; types are checked by pydantic.
A bad value is one ParamError line naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml

from pipeline.stage import StageError, dataset_name

PARAMS_FILE = Path("params.yaml")
# Settings that never change a result (where raw files come from, how long to wait for them): not DVC params, so
# that `dvc exp show` lists what makes experiments differ and a change reruns nothing. Optional, as its sections.
CONFIG_FILE = Path("config.yaml")


class ParamError(StageError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


# pydantic's error types, as segpipe words them.
_EXPECTED = {"int_type": "an integer", "float_type": "a finite number", "finite_number": "a finite number"}
_EXPECTED |= {"bool_type": "true or false", "string_type": "a string", "model_type": "a mapping"}
_EXPECTED |= dict.fromkeys(("list_type", "tuple_type"), "a list")
_TAGS = {"int", "float", "str", "bool"}
_list_to_tuple = pydantic.BeforeValidator(lambda value: tuple(value) if isinstance(value, list) else value)


def _strict(annotation: Any) -> Any:
    """``annotation`` for strict pydantic: nested dataclasses as models, a tuple given as a YAML list."""
    if dataclasses.is_dataclass(annotation):
        return _model(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_strict(a) for a in args)]  # noqa: UP007 (built from a runtime tuple)
    if origin is tuple:  # any length: a section's validate() says what length it needs
        return Annotated[tuple[_strict(args[0]), ...], _list_to_tuple]
    if origin is list:
        return list[_strict(args[0])] if args else list
    return annotation


_SECTIONS: dict[type, type] = {}  # each model of _model: the dataclass it checks


@functools.cache
def _model(cls: type) -> type[pydantic.BaseModel]:
    hints, fields = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        default = ... if f.default is dataclasses.MISSING else f.default
        if f.default_factory is not dataclasses.MISSING:
            default = pydantic.Field(default_factory=f.default_factory)
        fields[f.name] = (_strict(hints[f.name]), default)
    config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    model = pydantic.create_model(f"{cls.__name__}Schema", __config__=config, **fields)
    _SECTIONS[model] = cls
    return model


def _section_class(cls: type, loc: tuple) -> type:
    """The dataclass that holds the field at ``loc`` (field names and list indices from ``cls``)."""
    for name in loc:
        if isinstance(name, int):
            continue
        hint = typing.get_type_hints(cls)[name]
        cls = next(a for a in _inner_types(hint) if dataclasses.is_dataclass(a))
    return cls


def _inner_types(hint: Any) -> list:
    """``hint`` and the types inside it (``X | None``, ``list[X]``), depth first."""
    return [hint, *(inner for arg in typing.get_args(hint) for inner in _inner_types(arg))]


def _first_error(error: pydantic.ValidationError, key: str, cls: type) -> str:
    """The first of pydantic's errors (in the fields' order; unknown keys first) as one line naming the key."""
    first = sorted(
        error.errors(), key=lambda e: (e["type"] != "extra_forbidden", e["type"] == "extra_forbidden" and str(e["loc"]))
    )[0]
    # Without pydantic's tags of nested models and of a union's members (``threshold.float``).
    loc = [part for part in first["loc"] if not (isinstance(part, str) and part.endswith("Schema") or part in _TAGS)]
    path = key + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    if first["type"] == "extra_forbidden":
        known = [f.name for f in dataclasses.fields(_section_class(cls, tuple(loc[:-1])))]
        return f"{path}: unknown parameter (known: {', '.join(known)})"
    if first["type"] == "missing":
        return f"{path}: missing"
    expected = _EXPECTED.get(first["type"])
    if expected is None:
        return f"{path}: {first['msg']}, got {first['input']!r}"
    return f"{path}: expected {expected.format(**first.get('ctx', {}))}, got {first['input']!r}"


def _build(values: pydantic.BaseModel, key: str):
    """The dataclass of pydantic's validated ``values``, each nested section built and validated first."""
    fields = {}
    for name in type(values).model_fields:
        value = getattr(values, name)
        if isinstance(value, pydantic.BaseModel):
            value = _build(value, f"{key}.{name}")
        elif isinstance(value, list) and any(isinstance(item, pydantic.BaseModel) for item in value):
            value = [_build(item, f"{key}.{name}[{i}]") for i, item in enumerate(value)]
        fields[name] = value
    section = _SECTIONS[type(values)](**fields)
    section.validate(key)
    return section


def parse_section(cls: type, raw: Any, key: str):
    """``raw`` (a params.yaml section) as the dataclass ``cls``: types checked by pydantic, then ``validate(key)``."""
    if not isinstance(raw, dict):
        raise ParamError(f"{key}: expected a mapping, got {raw!r}")
    try:
        values = _model(cls).model_validate(raw)
    except pydantic.ValidationError as e:
        raise ParamError(_first_error(e, key, cls)) from None
    return _build(values, key)


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ParamError(f"{key}: {message}")


def _duplicate_key(node: yaml.Node, where: str = "", seen: set | None = None) -> str | None:
    """``line N: duplicate key a.b (first at line M)`` for the first key a mapping of ``node`` repeats (DVC refuses
    such a file); None if none. Keys a merge (``<<: *base``) brings may be overridden."""
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
    """params.yaml as DVC reads it: a UTF-8 YAML mapping without duplicate keys, its ``datasets`` dataset names."""
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
    """``<dataset>.<stage>`` of params.yaml (or config.yaml) as the dataclass ``schema``; a misspelled stage
    section is an error."""
    optional = path == CONFIG_FILE
    raw = {} if optional and not Path(path).exists() else read_params_file(path)
    section = raw.get(dataset, {} if optional else None)
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
