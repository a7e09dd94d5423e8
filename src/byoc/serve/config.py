"""The container's settings: one frozen object, the only place that reads flags or the environment.

Every setting has a flag (``--max-sessions``) and an environment variable (``BYOC_MAX_SESSIONS``); a flag
wins over the variable, the variable over the default. ``byoc serve --help`` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byoc.errors import ConfigError
from byoc.media.encoder import MAX_SEGMENT_S, EncoderSettings
from byoc.spec import SessionSettings
from byoc.trickle.client import TrickleClientSettings

__all__ = ["ENV_PREFIX", "DrainBudget", "Settings", "build_parser", "settings_from"]

ENV_PREFIX = "BYOC_"
_ENCODER = EncoderSettings()  # the defaults of the media settings below


@dataclass(frozen=True, slots=True)
class DrainBudget:
    """How the container's ``drain_timeout_s`` is shared out on SIGTERM (all in seconds).

    Unregistering may take ``unregister_s``; each session gets ``session_s`` to flush its encoder and
    publish its last segment (its own drain deadline); the runtime waits for the sessions until
    ``sessions_margin_s`` before the deadline, then cancels what is left until ``cancel_margin_s``
    before it, and tears the processor down until ``teardown_margin_s`` before it.
    """

    total_s: float
    unregister_s: float
    session_s: float
    sessions_margin_s: float = 0.5
    cancel_margin_s: float = 0.2
    teardown_margin_s: float = 0.1

    @classmethod
    def from_total(cls, seconds: float) -> DrainBudget:
        return cls(total_s=seconds, unregister_s=min(2.0, seconds / 4), session_s=max(1.0, seconds - 2.0))

    def sessions_wait_s(self, remaining_s: float) -> float:
        """How long to wait for the sessions with ``remaining_s`` left before the deadline."""
        return max(0.1, remaining_s - self.sessions_margin_s)

    def cancel_wait_s(self, remaining_s: float) -> float:
        return max(0.05, remaining_s - self.cancel_margin_s)

    def teardown_wait_s(self, remaining_s: float) -> float:
        return max(0.05, remaining_s - self.teardown_margin_s)


def _setting(default: Any, help: str, *, secret: bool = False, choices: Sequence[str] | None = None) -> Any:
    metadata = {"help": help, "secret": secret, "choices": choices}
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Everything ``byoc serve`` can be told."""

    processor: str = _setting("passthrough", "processor: a built-in name or package.module:attr")
    processor_option: tuple[str, ...] = _setting((), "KEY=VALUE passed to the processor (repeatable)")
    host: str = _setting("0.0.0.0", "address to listen on")
    port: int = _setting(8000, "port to listen on (0: any free port, logged at start)")
    max_sessions: int = _setting(4, "concurrent sessions this container accepts; more get 503")
    drain_timeout_s: float = _setting(8.0, "on SIGTERM, seconds to end every session and exit")
    token: str | None = _setting(None, "require 'Authorization: Bearer TOKEN' on stream routes", secret=True)
    health_style: str = _setting(
        "byoc",
        "health body: byoc (status ok + details) or ai-runner (LOADING|IDLE|OK|ERROR)",
        choices=("byoc", "ai-runner"),
    )
    max_body_bytes: int = _setting(10 * 1024 * 1024, "largest request body accepted (413 above)")
    switch_interval_ms: float = _setting(
        0.2,
        "CPython GIL switch interval; shorter keeps /health and trickle I/O prompt while processors "
        "hold the GIL",
    )
    thread_nice: int = _setting(
        10, "niceness added to the media and processing threads, so that requests are answered first"
    )
    # --- media ---
    segment_s: float = _setting(
        _ENCODER.segment_s, f"output segment length in seconds (at most {MAX_SEGMENT_S})"
    )
    preset: str = _setting(_ENCODER.preset, "x264 preset of the output")
    crf: int = _setting(_ENCODER.crf, "x264 constant rate factor of the output")
    status_interval_s: float = _setting(5.0, "seconds between status events of a session")
    max_session_s: float | None = _setting(None, "end a session after this many seconds")
    max_consecutive_errors: int = _setting(10, "processor failures in a row that end a session")
    latency_budget_ms: float = _setting(
        500.0,
        "how long after it is due in stream time a frame may still be processed; later frames give way "
        "to newer ones (bursts of early frames are held, never dropped)",
    )
    # --- trickle ---
    insecure_tls: bool = _setting(
        False, "do not verify TLS certificates of the orchestrator (go-livepeer's are self-signed)"
    )
    # --- GPU memory budget ---
    gpu_memory_per_session_mb: float | None = _setting(
        None, "GPU memory one session needs; default: measured while sessions run"
    )
    gpu_headroom_mb: float = _setting(512.0, "GPU memory always left free when admitting a session")
    # --- capability registration ---
    orchestrator_url: str | None = _setting(None, "orchestrator to register with, e.g. https://orch:8935")
    orch_secret: str | None = _setting(None, "the orchestrator's -orchSecret", secret=True)
    orch_secret_file: Path | None = _setting(None, "file holding the orchestrator secret")
    capability_name: str = _setting("byoc", "capability name advertised to the orchestrator")
    capability_url: str | None = _setting(None, "URL the orchestrator reaches this container at")
    capability_description: str = _setting("byoc live video container", "capability description")
    price_per_unit: int = _setting(0, "price numerator (per second of compute)")
    price_scaling: int = _setting(1, "price denominator")
    currency: str = _setting("wei", "price currency (wei or eth)", choices=("wei", "eth"))
    reregister_interval_s: float = _setting(30.0, "while idle, register again this often (0: never)")
    log_level: str = _setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port < 65536:
            problems.append(f"port must be 0..65535, got {self.port}")
        if self.max_sessions < 1:
            problems.append(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.drain_timeout_s <= 0:
            problems.append(f"drain_timeout_s must be > 0, got {self.drain_timeout_s}")
        if self.latency_budget_ms <= 0:
            problems.append(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        try:
            self.encoder()
        except ValueError as exc:
            problems.append(str(exc))
        if self.orchestrator_url and not (self.orch_secret or self.orch_secret_file):
            problems.append("orchestrator_url needs orch_secret or orch_secret_file")
        for option in self.processor_option:
            if "=" not in option:
                problems.append(f"processor_option must be KEY=VALUE, got {option!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    # --- derived -------------------------------------------------------------------------------

    @property
    def processor_options(self) -> dict[str, str]:
        return dict(option.split("=", 1) for option in self.processor_option)

    def secret(self) -> str | None:
        """The orchestrator secret, from the setting or its file (read when needed, never logged)."""
        if self.orch_secret:
            return self.orch_secret
        if self.orch_secret_file is not None:
            try:
                return self.orch_secret_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read orch_secret_file {self.orch_secret_file}: {exc}") from exc
        return None

    def advertised_url(self) -> str:
        """Where the orchestrator reaches this container (no trailing slash: O appends paths)."""
        if self.capability_url:
            return self.capability_url.rstrip("/")
        host = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def trickle(self) -> TrickleClientSettings:
        return TrickleClientSettings(verify_tls=not self.insecure_tls)

    def encoder(self) -> EncoderSettings:
        """The output's encoding (each session sets its own width and height)."""
        return EncoderSettings(segment_s=self.segment_s, preset=self.preset, crf=self.crf)

    def drain_budget(self) -> DrainBudget:
        return DrainBudget.from_total(self.drain_timeout_s)

    def session(self) -> SessionSettings:
        return SessionSettings(
            encoder=self.encoder(),
            status_interval_s=self.status_interval_s,
            drain_timeout_s=self.drain_budget().session_s,
            max_duration_s=self.max_session_s,
            max_consecutive_errors=self.max_consecutive_errors,
            latency_budget_s=self.latency_budget_ms / 1000.0,
            thread_nice=self.thread_nice,
            trickle=self.trickle(),
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _base_type(annotation: Any) -> Any:
    """int for ``int``, float for ``float | None``, and so on."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _parse(kind: Any, text: str, name: str) -> Any:
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return kind(text)
    except ValueError:
        raise ConfigError(f"{_env(name)}={text!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def build_parser(
    prog: str = "byoc serve", environ: Mapping[str, str] | None = None
) -> argparse.ArgumentParser:
    """An argument parser with one option per setting; environment values become its defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a BYOC live-video container: many sessions, admission, health, metrics, drain.",
        epilog=f"Every option can also be set with an environment variable {ENV_PREFIX}<NAME>, e.g. "
        f"{ENV_PREFIX}MAX_SESSIONS=8; options given on the command line win.",
    )
    for item in dataclasses.fields(Settings):
        kind = _base_type(hints[item.name])
        env = _env(item.name)
        default = item.default
        if env in environ:
            default = _parse(kind, environ[env], item.name)
        shown = "(secret)" if item.metadata["secret"] and default else default
        help_text = f"{item.metadata['help']} [env {env}; default {shown}]"
        if item.name == "processor":
            parser.add_argument("processor", nargs="?", default=default, help=help_text)
        elif kind is bool:
            parser.add_argument(
                _flag(item.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(
                _flag(item.name), action="append", default=None, metavar="KEY=VALUE", help=help_text
            )
            parser.set_defaults(**{f"{item.name}_env": default})
        else:
            converter = Path if kind is Path else kind
            parser.add_argument(
                _flag(item.name),
                type=converter,
                default=default,
                choices=item.metadata["choices"],
                help=help_text,
            )
    return parser


def settings_from(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from command-line arguments and the environment."""
    parser = build_parser(environ=environ)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for item in dataclasses.fields(Settings):
        if item.name == "processor_option":
            given = args.get("processor_option")
            values[item.name] = tuple(given) if given else tuple(args.get("processor_option_env", ()))
        else:
            values[item.name] = args[item.name]
    return Settings(**values)
