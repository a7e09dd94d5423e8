"""The ``byoc`` command line: ``byoc COMMAND [options]``; every command has its own ``--help``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence

from byoc import __version__

__all__ = ["COMMANDS", "main"]


def _serve(argv: Sequence[str]) -> int:
    import faulthandler

    from byoc.errors import ConfigError
    from byoc.logs import configure_logging
    from byoc.serve.config import settings_from, warn_secret_flags
    from byoc.serve.runtime import Runtime

    try:
        settings = settings_from(argv)
    except ConfigError as exc:
        print(f"byoc serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # A crash in native code (a segfault in a processor's extension) kills the process without a log
    # line; this writes every thread's Python stack to stderr, where the log goes, first.
    faulthandler.enable(all_threads=True)
    warn_secret_flags(argv)
    return asyncio.run(Runtime(settings).serve())


def _orchestrator(argv: Sequence[str]) -> int:
    from byoc.dev.orchestrator.app import main as orchestrator

    return orchestrator(list(argv))


def _check(argv: Sequence[str]) -> int:
    from byoc.dev.check.runner import main as check

    return check(list(argv))


def _publish(argv: Sequence[str]) -> int:
    from byoc.dev.publish import main as publish

    return publish(list(argv))


def _demo(argv: Sequence[str]) -> int:
    from byoc.dev.demo import main as demo

    return demo(list(argv))


def _init(argv: Sequence[str]) -> int:
    from byoc.scaffold import main as init

    return init(list(argv))


def _bench(argv: Sequence[str]) -> int:
    benchmarks = {
        "pipeline": "byoc.dev.bench.pipeline",
        "serve": "byoc.dev.bench.serve",
        "soak": "byoc.dev.bench.soak",
    }
    if not argv or argv[0] not in benchmarks:
        print(f"usage: byoc bench {{{','.join(benchmarks)}}} [options]", file=sys.stderr)
        return 2
    module = __import__(benchmarks[argv[0]], fromlist=["main"])
    return int(module.main(list(argv[1:])))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "init": (_init, "create a processor project: package, test, pyproject.toml, Dockerfile, README"),
    "serve": (_serve, "run the container: sessions, admission, health, metrics, drain, registration"),
    "orchestrator": (_orchestrator, "run a local development orchestrator (port 8935)"),
    "check": (_check, "run the production checklist against a container, with a report"),
    "publish": (_publish, "publish MPEG-TS (e.g. from ffmpeg) to a trickle channel"),
    "demo": (_demo, "run the demo: a local orchestrator, a container, three live streams"),
    "bench": (
        _bench,
        "run a benchmark: pipeline (one session), serve (sessions per process), soak (a long run)",
    ),
}


def _usage() -> str:
    lines = [f"usage: byoc COMMAND [options]   (byoc {__version__})", "", "commands:"]
    lines += [f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "byoc COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"byoc {__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"byoc: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return command[0](args[1:])


if __name__ == "__main__":
    sys.exit(main())
