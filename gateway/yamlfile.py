"""Load a YAML file into a pydantic model, with errors that name the file, line, key and what is allowed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gateway.logs import redact_url

M = TypeVar("M", bound=BaseModel)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


MAX_FILE_BYTES = 1024 * 1024


def on_off(v: object) -> object:
    """YAML reads a bare `on` / `off` as true / false: take them back as the words they were written as."""
    return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class ConfigError(Exception):
    """A config or policy file is wrong. The message is meant for the operator, one problem per line."""


def _line_map(node: yaml.Node | None, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path in the document to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = path + (key_node.value,)
            out[sub] = key_node.start_mark.line + 1
            _line_map(value_node, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)
    return out


def _interpolate(value: Any, path: tuple, problems: list[tuple[tuple, str]]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string."""
    if isinstance(value, dict):
        return {k: _interpolate(v, path + (k,), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path + (i,), problems) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        def repl(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            problems.append((path, f"environment variable {name} is not set"))
            return ""
        return _ENV_REF.sub(repl, value)
    return value


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file; return the data and a key-path → line map for error messages.

    Refused, as a ConfigError: a file over MAX_FILE_BYTES, bytes that are not UTF-8, and aliases (`*name`),
    whose expansion can turn a few hundred bytes into billions of nodes.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; a config or policy file is a few lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise ConfigError(f"{path}:{line}: YAML aliases (*{event.anchor}) are not allowed; "
                                  "write the value out")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    return data, _line_map(node)


def _where(path: Path, lines: dict[tuple, int], loc: tuple) -> str:
    """`file:line: dotted.key`, using the nearest enclosing key that has a line."""
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{path}:{lines[loc[:n]]}: {dotted}"
    return f"{path}: {dotted}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys a model accepts at the mapping that holds `loc[-1]`."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _looks_secret(key: object) -> bool:
    # Never echo the value of a key, token or password back into an error or a log.
    return isinstance(key, str) and any(w in key.lower() for w in ("key", "token", "secret", "password"))


def explain_validation_error(model: type[BaseModel], err: ValidationError, path: Path, lines: dict[tuple, int]) -> str:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if loc and loc[-1] == "[key]":  # pydantic's marker for a bad mapping key: report the key itself
            loc = loc[:-1]
            out.append(f"{_where(path, lines, loc)}: not an allowed key: {e['msg'].removeprefix('Value error, ')}")
            continue
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            msg = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            echo_ok = not any(_looks_secret(part) for part in loc)
            if echo_ok and "input" in e and not isinstance(e["input"], (dict, list)):
                shown = e["input"]
                if isinstance(shown, str) and "://" in shown:  # a URL may carry a password (redis://:pw@…)
                    shown = redact_url(shown)
                msg += f" (got {shown!r})"
        out.append(f"{_where(path, lines, loc)}: {msg}")
    return "\n".join(out)


def read_mapping(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """A YAML file whose top level is a mapping, with its line map. An empty file (or only comments, or
    only `---`) is an error: a file that lost its content must never count as "all defaults"."""
    data, lines = read_yaml(path)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; write at least one key (e.g. `strictness: moderate`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data, lines


def load_model(model: type[M], path: Path, data: dict[str, Any] | None = None,
               lines: dict[tuple, int] | None = None) -> M:
    """Validate a YAML file (or its already-read mapping) against `model`; raise ConfigError that says what to fix."""
    if data is None:
        data, lines = read_mapping(path)
    lines = lines or {}
    env_problems: list[tuple[tuple, str]] = []
    data = _interpolate(data, (), env_problems)
    problems = [f"{_where(path, lines, loc)}: {msg}" for loc, msg in env_problems]
    try:
        result = model.model_validate(data)
    except ValidationError as e:
        problems.append(explain_validation_error(model, e, path, lines))
    if problems:
        raise ConfigError("\n".join(problems))
    return result
