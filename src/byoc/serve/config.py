"""The container's settings: one frozen object, the only place that reads flags or the environment.

Every setting has a flag (``--max-sessions``) and an environment variable (``BYOC_MAX_SESSIONS``); a flag
wins over the variable, the variable over the default. ``byoc serve --help`` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byoc.errors import ConfigError
from byoc.media.encoder import MAX_SEGMENT_S, EncoderSettings
from byoc.params import MAX_PARAMS_BYTES
from byoc.spec import SessionSettings
from byoc.trickle.client import HostRule, TrickleClientSettings

__all__ = ["ENV_PREFIX", "DrainBudget", "Settings", "build_parser", "settings_from", "warn_secret_flags"]

log = logging.getLogger(__name__)

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


def _setting(
    default: Any,
    help: str,
    *,
    secret: bool = False,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> Any:
    metadata = {"help": help, "secret": secret, "choices": choices, "metavar": metavar}
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Everything ``byoc serve`` can be told."""

    processor: str = _setting("passthrough", "processor: a built-in name or package.module:attr")
    processor_option: tuple[str, ...] = _setting(
        (), "KEY=VALUE passed to the processor (repeatable)", metavar="KEY=VALUE"
    )
    host: str = _setting("0.0.0.0", "address to listen on")
    port: int = _setting(8000, "port to listen on (0: any free port, logged at start)")
    max_sessions: int = _setting(4, "concurrent sessions this container accepts; more get 503")
    drain_timeout_s: float = _setting(8.0, "on SIGTERM, seconds to end every session and exit")
    token: str | None = _setting(None, "require 'Authorization: Bearer TOKEN' on stream routes", secret=True)
    token_file: Path | None = _setting(None, "file holding the bearer token (instead of --token)")
    health_style: str = _setting(
        "byoc",
        "health body: byoc (status ok + details) or ai-runner (LOADING|IDLE|OK|ERROR)",
        choices=("byoc", "ai-runner"),
    )
    max_body_bytes: int = _setting(1024 * 1024, "largest request body accepted (413 above)")
    max_params_bytes: int = _setting(
        MAX_PARAMS_BYTES, "largest stream parameters, as JSON, a start or an update may carry (400 above)"
    )
    max_output_pixels: int = _setting(
        1920 * 1080, "largest output a stream may ask for, width x height (400 above)"
    )
    api_max_connections: int | None = _setting(
        None,
        "HTTP connections at once (the oldest idle one makes way for a new one; a few more always serve "
        "/health); default: what the open-file limit leaves beside the sessions' own connections",
    )
    api_header_timeout_s: float = _setting(
        10.0, "seconds a connection may take to send a request's headers, or stay idle between requests"
    )
    api_body_timeout_s: float = _setting(30.0, "seconds a request may take to send its body (408 after)")
    api_listener: str = _setting(
        "process",
        "who accepts the API's connections: a small process of its own that answers GET /health without "
        "waiting for this one and hands every other connection over (process), or this process (inline)",
        choices=("process", "inline"),
    )
    api_body_memory_bytes: int = _setting(
        8 * 1024 * 1024,
        "request bytes read at once over all connections; more wait briefly, then get 503",
    )
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
    audio_complexity: int = _setting(
        _ENCODER.audio_complexity, "Opus encoder complexity of the output audio, 0-10 (CPU for quality)"
    )
    codec: str = _setting(
        _ENCODER.codec,
        "video codecs: auto (NVIDIA NVDEC/NVENC where they work, else software), cpu (software) or "
        "nvidia (NVDEC/NVENC, refused at start-up where they do not work)",
        choices=("auto", "cpu", "nvidia"),
    )
    status_interval_s: float = _setting(5.0, "seconds between status events of a session")
    max_session_s: float | None = _setting(None, "end a session after this many seconds")
    max_consecutive_errors: int = _setting(10, "processor failures in a row that end a session")
    process_timeout_s: float = _setting(
        30.0,
        "a processor hook (process, on_params, ...) running longer ends its session as processor_hung "
        "and its thread is abandoned (0: no limit)",
    )
    isolation: str = _setting(
        "thread",
        "where the processor runs: thread (in this process, fastest; a native crash ends every session) "
        "or process (in worker processes: a crash ends only that worker's sessions, and the worker is "
        "started again)",
        choices=("thread", "process"),
    )
    isolation_workers: int | None = _setting(
        None, "with isolation process: how many worker processes (default: one per GPU, else one)"
    )
    leak_threshold_mb: float = _setting(
        0.0,
        "memory (resident, or any GPU's) this far above the idle baseline after a session ended "
        "recycles the processor: a fresh worker with isolation process; otherwise the container "
        "drains and exits 0 for its supervisor to restart it (0: never)",
    )
    recycle_after_sessions: int = _setting(
        0, "recycle the processor (as leak_threshold_mb does) after this many sessions (0: never)"
    )
    start_timeout_s: float = _setting(
        10.0, "a start whose on_start runs longer is refused (503) and leaves nothing but the thread"
    )
    stop_answer_timeout_s: float = _setting(
        3.0,
        "a /stream/stop is answered once the session's last output segment and final event are out, "
        "or after this many seconds (at most the session's share of --drain-timeout-s; 0: at once): "
        "go-livepeer closes the stream's channels as soon as it has the answer",
    )
    max_abandoned_threads: int = _setting(
        2, "threads stuck in the processor beyond this make /health unready and starts 503"
    )
    latency_budget_ms: float = _setting(
        500.0,
        "how long after it is due in stream time a frame may still be processed; later frames give way "
        "to newer ones (bursts of early frames are held, never dropped)",
    )
    # --- trickle ---
    insecure_tls: bool = _setting(
        False, "do not verify TLS certificates of the orchestrator (go-livepeer's are self-signed)"
    )
    output_failure_budget_s: float = _setting(
        20.0,
        "seconds a session's output may lose every segment (each one counted) before the session ends "
        "with output_unreachable",
    )
    allowed_channel_hosts: tuple[str, ...] = _setting(
        (),
        "hosts the channel URLs of a start may name: host (any port), host:port or * (any host); "
        "repeatable or comma-separated; default: the orchestrator's host when registering, else any "
        "host. The container's own API address is always refused",
        metavar="HOST[:PORT]",
    )
    # --- GPU memory budget ---
    gpu_memory_per_session_mb: float | None = _setting(
        None, "GPU memory one session needs; default: measured while sessions run"
    )
    gpu_headroom_mb: float = _setting(512.0, "GPU memory always left free when admitting a session")
    gpu: int | None = _setting(
        None,
        "pin this process to one GPU: NVML's device index (PCI bus order, as nvidia-smi lists them). "
        "CUDA then shows only that device, as cuda:0; memory readings and admission use it, and the "
        "registration names it. One process per GPU (default: every device the process can see)",
        metavar="INDEX",
    )
    # --- registration with an orchestrator ---
    protocol: str = _setting(
        "byoc",
        "how the container offers itself to the orchestrator: byoc (capability registration and "
        "/stream/* routes), live-runner (heartbeat registration, sessions through the orchestrator's "
        "proxy) or live-runner-static (the same sessions; the operator lists the runner in the "
        "orchestrator's configuration, which polls /health)",
        choices=("byoc", "live-runner", "live-runner-static"),
    )
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
    heartbeat_interval_s: float = _setting(
        5.0,
        "check that the orchestrator answers this often (0: never); after a failure, register again "
        "as soon as it answers and no session runs",
    )
    input_timeout_s: float = _setting(
        30.0,
        "a session that receives no input segment for this many seconds ends (input_timeout), so a "
        "client that vanished without closing its channel frees the slot (0: never)",
    )
    first_frame_timeout_s: float = _setting(
        30.0,
        "a session that has decoded no video frame this many seconds after its start ends "
        "(first_frame_timeout), so input that never decodes frees the slot (0: never)",
    )
    runner_price_usd_per_hour: float = _setting(
        0.0, "live runner: the price a session costs per hour, in USD (0: none sent; on-chain needs one)"
    )
    log_level: str = _setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port < 65536:
            problems.append(f"port must be 0..65535, got {self.port}")
        if self.max_sessions < 1:
            problems.append(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.drain_timeout_s <= 0:
            problems.append(f"drain_timeout_s must be > 0, got {self.drain_timeout_s}")
        if self.process_timeout_s < 0:
            problems.append(f"process_timeout_s must be >= 0, got {self.process_timeout_s}")
        if self.start_timeout_s <= 0:
            problems.append(f"start_timeout_s must be > 0, got {self.start_timeout_s}")
        if self.stop_answer_timeout_s < 0:
            problems.append(f"stop_answer_timeout_s must be >= 0, got {self.stop_answer_timeout_s}")
        if self.gpu is not None and self.gpu < 0:
            problems.append(f"gpu must be >= 0 (a device index), got {self.gpu}")
        if self.isolation_workers is not None and self.isolation_workers < 1:
            problems.append(f"isolation_workers must be >= 1, got {self.isolation_workers}")
        if self.leak_threshold_mb < 0 or self.recycle_after_sessions < 0:
            problems.append("leak_threshold_mb and recycle_after_sessions must be >= 0")
        if self.max_abandoned_threads < 0:
            problems.append(f"max_abandoned_threads must be >= 0, got {self.max_abandoned_threads}")
        for name in ("max_body_bytes", "max_params_bytes", "max_output_pixels", "api_body_memory_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.api_max_connections is not None and self.api_max_connections < 1:
            problems.append(f"api_max_connections must be >= 1, got {self.api_max_connections}")
        for name in ("api_header_timeout_s", "api_body_timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.latency_budget_ms <= 0:
            problems.append(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        if self.output_failure_budget_s <= 0:
            problems.append(f"output_failure_budget_s must be > 0, got {self.output_failure_budget_s}")
        try:
            self.encoder()
        except ValueError as exc:
            problems.append(str(exc))
        static = self.protocol == "live-runner-static"  # names the orchestrator only for its callbacks
        if self.orchestrator_url and not static and not (self.orch_secret or self.orch_secret_file):
            problems.append("orchestrator_url needs orch_secret or orch_secret_file")
        problems += self._secret_problems()
        try:
            self.channel_host_rules()
        except ValueError as exc:
            problems.append(f"allowed_channel_hosts: {exc}")
        if self.input_timeout_s < 0 or self.runner_price_usd_per_hour < 0:
            problems.append("input_timeout_s and runner_price_usd_per_hour must be >= 0")
        if self.first_frame_timeout_s < 0:
            problems.append(f"first_frame_timeout_s must be >= 0, got {self.first_frame_timeout_s}")
        if self.protocol == "live-runner" and not self.orchestrator_url:
            problems.append("protocol live-runner needs orchestrator_url")
        named = self.orchestrator_url or self.allowed_channel_hosts
        if self.protocol == "live-runner-static" and not named:
            # the session token goes to Livepeer-Session-Control: only to a host the operator named
            problems.append("protocol live-runner-static needs orchestrator_url or allowed_channel_hosts")
        if self.heartbeat_interval_s < 0:
            problems.append(f"heartbeat_interval_s must be >= 0, got {self.heartbeat_interval_s}")
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
        return _secret_value(self.orch_secret, self.orch_secret_file, "orch_secret_file")

    def bearer_token(self) -> str | None:
        """The stream routes' bearer token, from the setting or its file (read when needed)."""
        return _secret_value(self.token, self.token_file, "token_file")

    def _secret_problems(self) -> list[str]:
        """A secret given twice, or a secret file that cannot be read or is empty (which would
        silently turn authentication off), is a configuration error at start-up."""
        problems = []
        for name in ("orch_secret", "token"):
            try:
                if getattr(self, name) and getattr(self, f"{name}_file") is not None:
                    raise ConfigError(f"give {name} or {name}_file, not both")
                _secret_value(None, getattr(self, f"{name}_file"), f"{name}_file")
            except ConfigError as exc:
                problems.append(str(exc))
        return problems

    def channel_host_rules(self) -> tuple[HostRule, ...]:
        """``allowed_channel_hosts`` parsed (ValueError names a bad entry); empty: the default applies."""
        entries = (part for option in self.allowed_channel_hosts for part in option.split(","))
        return tuple(HostRule.parse(entry) for entry in entries if entry.strip())

    def advertised_url(self, bound_port: int | None = None) -> str:
        """Where the orchestrator reaches this container (no trailing slash: O appends paths); without
        ``capability_url``, on ``bound_port`` when given (the port actually bound, for ``port`` 0)."""
        if self.capability_url:
            return self.capability_url.rstrip("/")
        host = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port if bound_port is None else bound_port}"

    def trickle(self) -> TrickleClientSettings:
        return TrickleClientSettings(verify_tls=not self.insecure_tls)

    def encoder(self) -> EncoderSettings:
        """The output's encoding (each session sets its own width and height)."""
        return EncoderSettings(
            segment_s=self.segment_s,
            preset=self.preset,
            crf=self.crf,
            codec=self.codec,
            audio_complexity=self.audio_complexity,
        )

    def drain_budget(self) -> DrainBudget:
        return DrainBudget.from_total(self.drain_timeout_s)

    def stop_answer_s(self) -> float:
        """How long a ``/stream/stop`` waits for the session's final event: never longer than the
        session itself may take to end."""
        return min(self.stop_answer_timeout_s, self.drain_budget().session_s)

    def session(self) -> SessionSettings:
        return SessionSettings(
            encoder=self.encoder(),
            status_interval_s=self.status_interval_s,
            drain_timeout_s=self.drain_budget().session_s,
            max_duration_s=self.max_session_s,
            input_timeout_s=self.input_timeout_s or None,
            first_frame_timeout_s=self.first_frame_timeout_s or None,
            max_consecutive_errors=self.max_consecutive_errors,
            process_timeout_s=self.process_timeout_s or None,
            latency_budget_s=self.latency_budget_ms / 1000.0,
            thread_nice=self.thread_nice,
            trickle=self.trickle(),
            output_failure_budget_s=self.output_failure_budget_s,
            max_params_bytes=self.max_params_bytes,
        )


def _secret_value(value: str | None, path: Path | None, name: str) -> str | None:
    """A secret given directly, or else read from ``path``; ConfigError when the file is unusable."""
    if value:
        return value
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {name} {path}: {exc}") from exc
    if not text:
        raise ConfigError(f"{name} {path} is empty")
    return text


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
                _flag(item.name),
                action="append",
                default=None,
                metavar=item.metadata["metavar"],
                help=help_text,
            )
            parser.set_defaults(**{f"{item.name}_env": default})
        else:
            converter = Path if kind is Path else kind
            parser.add_argument(
                _flag(item.name),
                type=converter,
                default=default,
                choices=item.metadata["choices"],
                metavar=item.metadata["metavar"],
                help=help_text,
            )
    return parser


def settings_from(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from command-line arguments and the environment."""
    parser = build_parser(environ=environ)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for item in dataclasses.fields(Settings):
        if f"{item.name}_env" in args:  # a repeatable option: the flags, else the environment's list
            given = args.get(item.name)
            values[item.name] = tuple(given) if given else tuple(args[f"{item.name}_env"])
        else:
            values[item.name] = args[item.name]
    return Settings(**values)


def warn_secret_flags(argv: Sequence[str]) -> list[str]:
    """Log a warning for each secret given as a flag (any process on the machine can read it in
    ``/proc/PID/cmdline``); the flags, for the caller. The environment and the ``*_file`` options
    keep secrets off the command line."""
    given = vars(build_parser(environ={}).parse_args(argv))
    flags = []
    for item in dataclasses.fields(Settings):
        if item.metadata["secret"] and given[item.name]:
            flag = _flag(item.name)
            flags.append(flag)
            log.warning(
                "%s on the command line is visible to every process on this machine; use %s-file or "
                "the environment variable %s instead",
                flag,
                flag,
                _env(item.name),
            )
    return flags
