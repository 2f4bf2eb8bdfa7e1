"""Options: every setting is a CLI flag and a ``FACEPIPE_<NAME>`` environment variable.

Flags win over the environment, the environment over defaults. A ``FACEPIPE_*`` variable that
is not an option of the program is refused (a misspelt setting must not be silently ignored).
A bad or missing option raises :class:`ConfigError`, which :func:`run_main` turns into one line
on stderr and exit status 2. Secrets are never options themselves: they are read from files, or
from systemd's ``$CREDENTIALS_DIRECTORY`` when the unit passes them with ``LoadCredential=``.

A program's :class:`Option` list owns each option's name, parser, default and help. A frozen
dataclass registered with :func:`config_of` gives the parsed values their types: its fields
are the options' names (a field typed with another registered dataclass takes that group's
options, e.g. ``mqtt: MqttConfig``), checked against the list when the class is defined.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import os
import socket
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from facepipe.contract import DEVICE_ID_RE, is_valid_device_id

ENV_PREFIX = "FACEPIPE_"
EXIT_CONFIG = 2


class ConfigError(Exception):
    """A bad or missing option; the message names the option and what is wrong."""


@dataclass(frozen=True)
class Option:
    """One setting: ``name`` gives the flag ``--name-with-dashes`` and ``FACEPIPE_NAME``."""

    name: str
    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""
    required: bool = False
    flag_only_value: str | None = None  # value of a bare flag (``--loop`` means ``true``)
    # A secret's way in: ``$CREDENTIALS_DIRECTORY/<credential>`` (systemd's LoadCredential=),
    # read before the environment (a flag still wins). Its value never reaches a log or an error.
    credential: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def label(self) -> str:
        return f"{self.flag} / {self.env}"


# --- value parsers: raise ValueError with a short reason -------------------------------


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _number(kind: Callable[[str], Any], low: float | None, high: float | None) -> Callable:
    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            raise ValueError(f"expected a {kind.__name__}, got {text!r}") from None
        if low is not None and value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}, got {value}")
        return value

    return parse


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    return _number(int, low, high)


def float_range(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    return _number(float, low, high)


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return value

    return parse


def non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def device_id(text: str) -> str:
    value = text.strip()
    if not is_valid_device_id(value):
        raise ValueError(f"{value!r} does not match {DEVICE_ID_RE.pattern}")
    return value


def topic_prefix(text: str) -> str:
    value = text.strip().strip("/")
    if not value or any(c in value for c in "+#\0") or value.startswith("$"):
        raise ValueError(f"{text!r} is not a plain topic prefix (no wildcards, not $...)")
    return value


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma- or blank-separated addresses or prefixes (``127.0.0.1``, ``10.0.0.0/8``, ``::1``)."""
    items = [item for item in text.replace(",", " ").split() if item]
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    except ValueError as exc:
        raise ValueError(f"{exc} (addresses or prefixes, not host names)") from None


def networks(text: str) -> str:
    """A checked list of networks, as ``parse_networks`` reads it back: ``10.0.0.0/8 ::1/128``."""
    return " ".join(str(network) for network in parse_networks(text))


def existing_file(text: str) -> Path:
    path = Path(text.strip())
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def default_hostname() -> str:
    return socket.gethostname().split(".")[0]


def resolve_device_id(value: str | None) -> str:
    """``--device-id`` if given, else this host's name (which must then be a valid id)."""
    if value:
        return value
    host = default_hostname()
    if not is_valid_device_id(host):
        raise ConfigError(
            f"--device-id / FACEPIPE_DEVICE_ID: the hostname {host!r} is not a valid device id "
            f"({DEVICE_ID_RE.pattern}); set one"
        )
    return host


# --- typed configurations: a frozen dataclass per option list -------------------------------

C = TypeVar("C")

_OPTIONS_OF: dict[type, tuple[Option, ...]] = {}


def config_of(options: Sequence[Option]) -> Callable[[type[C]], type[C]]:
    """Register a frozen dataclass as the typed form of ``options``; check it now.

    Its fields must be exactly the options' names, each typed to hold what the option's
    parser returns (``X | None`` exactly when the option may be unset). A field typed with
    another registered dataclass stands for that class's options, which must be the very
    same :class:`Option` objects. A mismatch raises TypeError at import time.
    """

    def register(cls: type[C]) -> type[C]:
        _OPTIONS_OF[cls] = tuple(options)
        try:
            _check_config(cls, tuple(options))
        except TypeError:
            del _OPTIONS_OF[cls]
            raise
        return cls

    return register


def config_options(cls: type) -> tuple[Option, ...]:
    """The options a registered configuration dataclass holds."""
    return _OPTIONS_OF[cls]


def _field_types(cls: type) -> dict[str, Any]:
    params = getattr(cls, "__dataclass_params__", None)
    if not dataclasses.is_dataclass(cls) or params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _allowed(hint: Any) -> tuple[type, ...]:
    """The runtime types a field annotation allows (``int | None`` -> (int, NoneType))."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(arg for arg in typing.get_args(hint) if isinstance(arg, type))
    if isinstance(hint, type):
        return (hint,)
    raise TypeError(f"unsupported option field type {hint!r}")


def _check_config(cls: type, options: tuple[Option, ...]) -> None:
    by_name = {opt.name: opt for opt in options}
    if len(by_name) != len(options):
        raise TypeError(f"{cls.__name__}: an option is listed twice")
    covered: list[str] = []
    for name, hint in _field_types(cls).items():
        if hint in _OPTIONS_OF:  # a group, e.g. mqtt: MqttConfig
            group = _OPTIONS_OF[hint]
            strays = [opt.name for opt in group if by_name.get(opt.name) is not opt]
            if strays:
                raise TypeError(
                    f"{cls.__name__}.{name}: {hint.__name__}'s options {strays} are not "
                    "the ones in its option list"
                )
            covered += [opt.name for opt in group]
            continue
        covered.append(name)
        opt = by_name.get(name)
        if opt is None:
            continue  # reported below
        allowed = _allowed(hint)
        may_be_unset = opt.default is None and not opt.required
        if (type(None) in allowed) != may_be_unset:
            need = "must" if may_be_unset else "must not"
            raise TypeError(f"{cls.__name__}.{name}: {hint} {need} allow None")
        if opt.default is not None and not isinstance(opt.default, allowed):
            raise TypeError(f"{cls.__name__}.{name}: default {opt.default!r} is not {hint}")
    missing = sorted(set(by_name) - set(covered))
    extra = sorted(set(covered) - set(by_name))
    twice = sorted({name for name in covered if covered.count(name) > 1})
    if missing or extra or twice:
        raise TypeError(
            f"{cls.__name__} does not match its options: missing fields {missing}, "
            f"fields that are no option {extra}, options held twice {twice}"
        )


def build_config(cls: type[C], values: Mapping[str, Any]) -> C:
    """An instance of the registered dataclass ``cls`` from parsed option values by name."""
    if cls not in _OPTIONS_OF:
        raise TypeError(f"{cls.__name__} is not registered with config_of")
    kwargs: dict[str, Any] = {}
    for name, hint in _field_types(cls).items():
        if hint in _OPTIONS_OF:
            kwargs[name] = build_config(hint, values)
            continue
        value = values[name]
        if not isinstance(value, _allowed(hint)):  # a parser returning the wrong type: a bug
            raise TypeError(f"{cls.__name__}.{name}: {value!r} is not {hint}")
        kwargs[name] = value
    return cls(**kwargs)


# --- common options ---------------------------------------------------------------------

LOG_LEVEL = Option(
    "log_level", choice("debug", "info", "warning", "error"), "info", "log verbosity"
)

LOGGING_OPTIONS: tuple[Option, ...] = (
    LOG_LEVEL,
    Option("stats_interval", float_range(1), 60.0, "seconds between stats log lines"),
    Option("metrics_port", int_range(0, 65535), 0, "Prometheus metrics port (0 = off)"),
    Option("metrics_address", non_empty, "127.0.0.1", "address the metrics port binds to"),
    Option(
        "metrics_allow",
        networks,
        "127.0.0.0/8 ::1/128",
        "addresses or prefixes that may scrape the metrics (others: closed on arrival)",
    ),
)

MQTT_OPTIONS: tuple[Option, ...] = (
    Option("mqtt_host", non_empty, "localhost", "MQTT broker host"),
    Option("mqtt_port", int_range(1, 65535), 1883, "MQTT broker port"),
    Option("mqtt_username", non_empty, None, "MQTT user name"),
    Option(
        "mqtt_password_file",
        non_empty,
        None,
        "file holding the MQTT password ($CREDENTIALS_DIRECTORY/mqtt-password wins)",
    ),
    Option("mqtt_tls_ca", existing_file, None, "CA bundle: enables TLS with verification"),
    Option("mqtt_client_id", non_empty, None, "MQTT client id"),
    Option("mqtt_protocol", choice("5", "3.1.1"), "5", "MQTT protocol version"),
    Option("mqtt_keepalive", int_range(5, 3600), 30, "MQTT keepalive in seconds"),
    Option("topic_prefix", topic_prefix, "faces", "topic prefix: faces go to <prefix>/<device>"),
    Option("qos", int_range(0, 1), 1, "MQTT QoS for face messages"),
)


@config_of(LOGGING_OPTIONS)
@dataclass(frozen=True)
class LoggingConfig:
    """Logging, the stats line and the metrics port (every long-running program)."""

    log_level: str
    stats_interval: float
    metrics_port: int
    metrics_address: str
    metrics_allow: str  # networks(): parse_networks reads it


@config_of(MQTT_OPTIONS)
@dataclass(frozen=True)
class MqttConfig:
    """The MQTT connection and the face topics (every program that talks MQTT)."""

    mqtt_host: str
    mqtt_port: int
    mqtt_username: str | None
    mqtt_password_file: str | None
    mqtt_tls_ca: Path | None
    mqtt_client_id: str | None
    mqtt_protocol: str
    mqtt_keepalive: int
    topic_prefix: str
    qos: int


# --- parsing ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def parse_config(
    cls: type[C],
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """The registered dataclass ``cls`` from flags, then ``FACEPIPE_*`` variables, then
    defaults (``argv`` defaults to ``sys.argv[1:]``, ``environ`` to ``os.environ``)."""
    values, _ = _parse(prog, description, config_options(cls), argv, environ, None)
    return build_config(cls, values)


def parse_config_and_arguments(
    cls: type[C],
    prog: str,
    description: str,
    positional: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[C, list[str]]:
    """Like :func:`parse_config`, plus a list of positional arguments (e.g. files) as given;
    ``positional`` names them in ``--help``."""
    values, arguments = _parse(prog, description, config_options(cls), argv, environ, positional)
    return build_config(cls, values), arguments


def unknown_settings(prog: str, options: Sequence[Option], environ: Mapping[str, str]) -> str:
    """'' if every ``FACEPIPE_*`` variable in ``environ`` is an option of the program, else
    one line naming the others (with the closest option name, if one is close)."""
    known = {opt.env: opt for opt in options}
    problems = []
    for name in sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known):
        close = difflib.get_close_matches(
            name.removeprefix(ENV_PREFIX), [env.removeprefix(ENV_PREFIX) for env in known], n=1
        )
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
        problems.append(f"unknown setting {name} (not an option of {prog}{hint})")
    return "; ".join(problems)


def _parse(
    prog: str,
    description: str,
    options: Sequence[Option],
    argv: Sequence[str] | None,
    environ: Mapping[str, str] | None,
    positional: str | None,
) -> tuple[dict[str, Any], list[str]]:
    """Every option's value by name, from flags, then ``FACEPIPE_*`` variables, then
    defaults; and the positional arguments."""
    env = os.environ if environ is None else environ
    parser = _Parser(
        prog=prog,
        description=description,
        epilog="Every flag can also be set as FACEPIPE_<NAME> in the environment; flags win. "
        "Other FACEPIPE_* variables are refused.",
    )
    for opt in options:
        default_text = "" if opt.default is None else f" (default: {opt.default})"
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            nargs="?" if opt.flag_only_value is not None else None,
            const=opt.flag_only_value,
            metavar=opt.name.upper(),
            help=f"{opt.help}{default_text} [env {opt.env}]",
        )
    if positional:
        parser.add_argument(positional, nargs="*", metavar=positional.upper())
    raw = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = unknown_settings(prog, options, env)
    if unknown:
        raise ConfigError(unknown)
    values: dict[str, Any] = {}
    for opt in options:
        text = getattr(raw, opt.name)
        if text is None and opt.credential:
            text = read_secret(
                None, opt.credential, f"{opt.label} (credential {opt.credential})", env
            )
        if text is None:
            text = env.get(opt.env)
            if text is not None and text.strip() == "" and opt.default is not None:
                text = None  # an empty line in an EnvironmentFile means "use the default"
        if text is None:
            if opt.required and opt.default is None:
                raise ConfigError(f"{opt.label} is required")
            values[opt.name] = opt.default
            continue
        try:
            values[opt.name] = opt.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{opt.label}: {exc}") from None
    return values, list(getattr(raw, positional)) if positional else []


def read_secret(
    path: str | None,
    credential: str,
    label: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """A secret from ``$CREDENTIALS_DIRECTORY/<credential>`` or else from ``path``.

    Only the first line counts, without its line break. The value is never logged.
    """
    env = os.environ if environ is None else environ
    candidates: list[Path] = []
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        candidates.append(Path(cred_dir) / credential)
    if path:
        candidates.append(Path(path))
    if not candidates:
        return None
    source = candidates[0]
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {source}: {exc.strerror}") from None
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise ConfigError(f"{label}: {source} is empty")
    return secret


def run_main(prog: str, main: Callable[[], int]) -> NoReturn:
    """Run a program's main; configuration errors become one line and exit status 2."""
    try:
        code = main()
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
