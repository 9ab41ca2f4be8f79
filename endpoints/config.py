"""One configuration file (TOML) for everything the flags of `cimhes serve|demo|collect` set.

A key is a flag's long name without its dashes (`--max-connections 64` is `max-connections = 64`),
so every option an `endpoints/*_options.py` module adds is a configuration key with no code
here: keys are read off the command's argparse parser. Top-level keys apply to each of the
commands that has that flag; a `[serve]`, `[demo]` or `[collect]` table applies to that command
only (and wins over a top-level key). Precedence, highest first: a flag on the command line, an
option's own environment variable (`CIMHES_AMQP_URL`), the file's command table, the file's top
level, the built-in default. A repeatable flag given on the command line replaces the file's list.

The file is `--config FILE`, else `$CIMHES_CONFIG`; none: defaults and flags only. A key no
command knows, a table other than the commands', or a value of the wrong type is refused with one
line naming the file and the key. `cimhes config show [COMMAND [FLAGS...]]` prints the effective
configuration of a command as TOML, secrets masked (`masked`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV = "CIMHES_CONFIG"
COMMANDS = ("serve", "demo", "collect")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# Options whose default comes from an environment variable: the variable beats the file.
OPTION_ENVIRONMENT = {"amqp_url": "CIMHES_AMQP_URL"}
# Flags that are not configuration: where the configuration is, and argparse's help.
_NOT_KEYS = {"config", "help"}
_SECRET_NAME = re.compile(r"password|secret|token|passphrase", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^/@\s]*@")
MASK = "***"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--log-level` and `--log-format` of a command that reads the file."""
    group = parser.add_argument_group("configuration and log")
    group.add_argument("--config", metavar="FILE",
                       help=f"TOML configuration file (default ${ENV}; README, "
                            f"\"Configuration\"); flags override it")
    group.add_argument("--log-level", choices=LOG_LEVELS, default="info", type=str.lower,
                       help="least severe log records written (default info)")
    group.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="stderr log lines: text, or json (one JSON object a line)")


def config_path(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Path | None:
    """The file named by `--config` in `argv` (the last one), else by $CIMHES_CONFIG."""
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token.partition("=")[2]
    found = found or environ.get(ENV) or None
    return Path(found) if found else None


def read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"configuration {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration {path} is not TOML: {exc}") from None


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A command's configuration keys (flag long names without dashes) and their actions."""
    keys = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        long_names = [s for s in action.option_strings if s.startswith("--")]
        if not long_names or action.dest in _NOT_KEYS or action.dest == argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        keys[long_names[0][2:]] = action
    return keys


def file_values(path: Path, data: dict, parsers: Mapping[str, argparse.ArgumentParser],
                command: str, convert: bool = True) -> dict[str, tuple[object, str]]:
    """{dest: (value, where)} the file gives `command`; ConfigError for anything unknown in it,
    whichever command it was meant for (one file serves them all)."""
    known = {name: options(p) for name, p in parsers.items()}
    top_level = set().union(*(keys for keys in known.values()))
    values: dict[str, tuple[object, str]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in known:
                raise ConfigError(f"configuration {path}: unknown table [{key}] (tables: "
                                  f"{', '.join(f'[{c}]' for c in known)})")
            for inner, inner_value in value.items():
                if isinstance(inner_value, dict) or inner not in known[key]:
                    raise ConfigError(f"configuration {path}: unknown key {inner!r} in [{key}] "
                                      f"(`cimhes {key} -h` lists the flags; a key is a flag "
                                      f"without its dashes)")
                checked = _value(path, f"[{key}] {inner}", known[key][inner], inner_value,
                                 convert)
                if key == command:
                    values[known[key][inner].dest] = (checked, f"file [{key}]")
            continue
        if key not in top_level:
            raise ConfigError(f"configuration {path}: unknown key {key!r} (no command of "
                              f"{', '.join(known)} has a flag --{key})")
        for name, keys in known.items():
            if key in keys:
                checked = _value(path, key, keys[key], value, convert)
                if name == command:
                    values.setdefault(keys[key].dest, (checked, "file"))
    # A command table wins over the top level whatever their order in the file.
    for key, value in data.get(command, {}).items():
        action = known[command][key]
        values[action.dest] = (_value(path, f"[{command}] {key}", action, value, convert),
                               f"file [{command}]")
    return values


def _value(path: Path, key: str, action: argparse.Action, value, convert: bool):
    where = f"configuration {path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is true or false, not {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_one(where, action, item, convert) for item in items]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where} takes one value, not {type(value).__name__}")
    return _one(where, action, value, convert)


def _one(where: str, action: argparse.Action, value, convert: bool):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: {value!r} is not a value of --{where.rsplit(' ', 1)[-1]}")
    kind = action.type
    try:
        if kind in (int, float):
            if isinstance(value, str) or kind is int and isinstance(value, float):
                raise ValueError(f"a number, not {value!r}")
            converted = kind(value)
        elif kind is None or kind is str:
            if not isinstance(value, str):
                raise ValueError(f"a string, not {value!r}")
            converted = value
        else:
            converted = kind(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where} is one of {', '.join(map(str, action.choices))}, "
                          f"not {value!r}")
    return converted if convert else value


def parse(parser: argparse.ArgumentParser, parsers: Mapping[str, argparse.ArgumentParser],
          argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """`parser.parse_args(argv)` with the configuration file's values as the defaults of the
    command named in argv (one of `parsers`)."""
    command = next((token for token in argv if not token.startswith("-")), None)
    path = config_path(argv, environ) if command in parsers else None
    if path is None:
        return parser.parse_args(argv)
    data = read_file(path)
    sub = parsers[command]
    given = _apply(sub, file_values(path, data, parsers, command), environ)
    args = parser.parse_args(argv)
    for dest, value in given.items():
        if getattr(args, dest) in (None, []):  # no flag given: the file's list
            setattr(args, dest, value)
    return args


def _apply(sub, values: dict, environ) -> dict:
    """Set the file's values as `sub`'s defaults; the repeatable ones are returned instead
    (argparse would append flags to a list default rather than replace it)."""
    lists = {}
    defaults = {}
    actions = {a.dest: a for a in sub._actions}
    for dest, (value, _where) in values.items():
        if environ.get(OPTION_ENVIRONMENT.get(dest, "")):
            continue
        if isinstance(actions[dest], argparse._AppendAction):
            lists[dest] = value
        else:
            defaults[dest] = value
    sub.set_defaults(**defaults)
    return lists


def show(parsers: Mapping[str, argparse.ArgumentParser], argv: Sequence[str],
         environ: Mapping[str, str] = os.environ) -> str:
    """`cimhes config show [COMMAND [FLAGS...]]`: the command's (default serve) effective
    configuration as TOML, each value's origin in a comment, secrets masked."""
    command = argv[0] if argv and not argv[0].startswith("-") else "serve"
    if command not in parsers:
        raise ConfigError(f"config show: no command {command!r} ({', '.join(parsers)})")
    flags = list(argv[1:] if argv and argv[0] == command else argv)
    sub = parsers[command]
    path = config_path(flags, environ)
    from_file = {}
    if path is not None:
        # Every table is checked, and the values kept as written (they are shown so).
        data = read_file(path)
        from_file = file_values(path, data, parsers, command, convert=False)
    keys = options(sub)
    # Parse the flags as written: no type conversion, nothing required.
    saved = [(a, a.type, a.required, a.default) for a in keys.values()]
    try:
        for action in keys.values():
            action.type, action.required = None, False
            action.default = None if not isinstance(action, argparse._AppendAction) else []
        given = vars(sub.parse_args(flags))
    except SystemExit:
        raise ConfigError(f"config show {command}: flags not understood: {' '.join(flags)}") \
            from None
    finally:
        for action, kind, required, default in saved:
            action.type, action.required, action.default = kind, required, default
    lines = [f"# cimhes {command}: effective configuration "
             f"({'file ' + str(path) if path else 'no configuration file'}); "
             "origin of each value after it", f"[{command}]"]
    for key, action in sorted(keys.items()):
        env = OPTION_ENVIRONMENT.get(action.dest)
        if given.get(action.dest) not in (None, []):
            value, origin = _as_typed(action, given[action.dest]), "flag"
        elif env and environ.get(env):
            value, origin = environ[env], f"${env}"
        elif action.dest in from_file:
            value, origin = from_file[action.dest]
        else:
            value, origin = action.default, "default"
        if value is None or value == []:
            lines.append(f"# {key}: unset  ({origin})")
        else:
            lines.append(f"{key} = {_toml(masked(key, value))}  # {origin}")
    return "\n".join(lines)


def _as_typed(action: argparse.Action, value):
    """A flag's value as its option types it, when that is a plain TOML value; else as written
    (a ControlLimit is shown as its flag text)."""
    if isinstance(value, list):
        return [_as_typed(action, item) for item in value]
    if not isinstance(value, str) or action.type is None:
        return value
    try:
        typed = action.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return value
    return typed if isinstance(typed, (str, int, float)) else value


def masked(key: str, value):
    """`value` with secrets replaced by ***: a password in a URL (also inside NAME=URL), and the
    whole value of a key named like a password, secret or token (not a file holding one: its
    path is shown, never its contents, which nothing here reads)."""
    if isinstance(value, list):
        return [masked(key, item) for item in value]
    if value is None or isinstance(value, bool):
        return value
    if _SECRET_NAME.search(key) and not key.endswith("-file"):
        return MASK
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", value)
    return value


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)
