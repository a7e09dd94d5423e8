"""Turns a :class:`~byoc.dev.check.model.CheckResult` into what people read: the terminal summary, a JSON
file and a self-contained report (``index.html`` + ``report.md`` + PNG plots).

The plots need matplotlib, an optional extra (``pip install 'byoc-runtime[report]'``); it is imported only
when a report is written, and drawn with the Agg canvas on private ``Figure`` objects, so nothing is
left in pyplot's global state.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from byoc.dev.check.model import CheckResult, HealthSample, MemoryFit, StepResult
from byoc.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["terminal_lines", "write_json", "write_report"]

MIB = 1024 * 1024
REAL_TIME_SHARE = 0.95
"""A session keeps up when it delivers at least this share of the input frame rate."""

_MINUS = "\u2212"
FORMULA = f"recommended = floor((total {_MINUS} headroom {_MINUS} base) / per-session peak)"

_SMALL: dict[str, Any] = {"fontsize": 8}
_GREEN, _RED, _BOLD, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[1m", "\x1b[0m"


def _mib(n: int | float) -> str:
    return f"{n / MIB:,.1f}"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _verdict(result: CheckResult) -> str:
    failed = sum(not item.passed for item in result.items)
    if not result.items:
        return "no checks ran"
    return "all checks passed" if failed == 0 else f"{failed} of {len(result.items)} checks failed"


def _why_none(fit: MemoryFit) -> str:
    if fit.per_session <= 0:
        return f"{fit.resource} does not grow with sessions ({_mib(fit.per_session)} MiB per session)"
    room = fit.total - fit.headroom - fit.base
    if room < fit.per_session:
        return (
            f"{fit.resource} has {_mib(room)} MiB left after base and headroom, "
            f"less than one session ({_mib(fit.per_session)} MiB)"
        )
    return f"{fit.resource} gave no figure"


def _recommendation(result: CheckResult) -> str:
    """One sentence: the recommended ``--max-sessions`` and what limits it, or why there is none."""
    chosen = result.recommended_max_sessions
    if chosen is None:
        if not result.fits:
            return "no recommended --max-sessions: memory was not measured at more than one step"
        reasons = [_why_none(fit) for fit in result.fits if fit.recommended_max_sessions is None]
        return "no recommended --max-sessions" + (": " + "; ".join(reasons) if reasons else "")
    text = f"recommended --max-sessions {chosen}"
    limiting = [fit for fit in result.fits if fit.recommended_max_sessions == chosen]
    if limiting:
        fit = limiting[0]
        return text + (
            f" (limited by {fit.resource}: floor(({_mib(fit.total)} {_MINUS} {_mib(fit.headroom)} {_MINUS} "
            f"{_mib(fit.base)} MiB) / {_mib(fit.per_session)} MiB) = {chosen})"
        )
    by_memory = [
        f"{f.resource} {f.recommended_max_sessions}" for f in result.fits if f.recommended_max_sessions
    ]
    return text + (f" (memory alone: {', '.join(by_memory)})" if by_memory else "")


def terminal_lines(result: CheckResult, *, color: bool = False) -> list[str]:
    """The final summary: one line per checklist item, the recommendation, then the verdict."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    lines: list[str] = []
    for item in result.items:
        if item.passed:
            lines.append(f"{paint('PASS', _GREEN)}  {item.name}  {item.summary}")
        else:
            reason = f" — {item.reason}" if item.reason else ""
            lines.append(f"{paint('FAIL', _RED)}  {item.name}  {item.summary}{reason}")
    lines.append(_recommendation(result))
    lines.append(paint(_verdict(result), _BOLD + (_GREEN if result.passed else _RED)))
    return lines


def _jsonable(value: object) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return [_jsonable(item) for item in sorted(value, key=repr)]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)


def write_json(result: CheckResult, path: Path) -> None:
    """``result.as_dict()`` as pretty-printed JSON; numbers are written as they are, not rounded."""
    text = json.dumps(_jsonable(result.as_dict()), indent=2, ensure_ascii=False, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


# -- plots -------------------------------------------------------------------------------------------


def _no_data(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _plot_memory(fig: Figure, fits: list[MemoryFit]) -> None:
    if not fits:
        _no_data(fig, "no memory fit")
        return
    axes = fig.subplots(1, len(fits), squeeze=False)[0]
    for ax, fit in zip(axes, fits, strict=True):
        xs = [sessions for sessions, _ in fit.points]
        ys = [peak / MIB for _, peak in fit.points]
        line_x = [0, max([1, *xs])]
        line_y = [(fit.base + fit.per_session * x) / MIB for x in line_x]
        ax.scatter(xs, ys, color="C0", zorder=3, label="peak per step")
        ax.plot(line_x, line_y, color="C1", label="fit")
        budget = (fit.total - fit.headroom) / MIB
        top = max([*ys, *line_y, 0.0])
        note = ""
        if 0 < budget <= 2 * top:  # drawn only where it does not squash the measured points
            top = max(top, budget)
            ax.axhline(
                budget, color="C3", linestyle="--", label=f"total {_MINUS} headroom ({budget:,.0f} MiB)"
            )
        else:
            note = f"\ntotal {_MINUS} headroom {budget:,.0f} MiB (off the chart)"
        figures = f"base {_mib(fit.base)} MiB\nper session {_mib(fit.per_session)} MiB\n"
        box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.8}
        ax.text(0.03, 0.97, f"{figures}residual {_mib(fit.residual)} MiB{note}", **_SMALL, bbox=box,
                transform=ax.transAxes, va="top")  # fmt: skip
        ax.set_title(f"{fit.resource} (total {_mib(fit.total)} MiB, {fit.total_source})", fontsize=9)
        ax.set_xlabel("sessions")
        ax.set_ylabel("peak memory (MiB)")
        ax.set_ylim(0, top * 1.3 or 1.0)  # room for the figures box above the data
        ax.set_xticks(sorted({*xs, *line_x}))
        ax.legend(loc="lower right", **_SMALL)


def _ms(sample: HealthSample) -> float:
    return max(sample.latency_ms, 0.01)  # a failed request may report 0, which a log axis cannot show


def _plot_health(fig: Figure, health: list[HealthSample], steps: list[StepResult]) -> None:
    if not health and not steps:
        _no_data(fig, "no /health samples")
        return
    ax = fig.add_subplot()
    for i, step in enumerate(steps):
        ax.axvspan(step.started_at, step.ended_at, color="C2" if i % 2 else "C1", alpha=0.12, lw=0)
        middle = (step.started_at + step.ended_at) / 2
        ax.text(middle, 0.98, f"{step.sessions} sess.", transform=ax.get_xaxis_transform(), ha="center",
                va="top", **_SMALL)  # fmt: skip
    if health:
        ax.plot([h.t for h in health], [_ms(h) for h in health], lw=0.8, color="C0")
        ax.set_yscale("log")
    bad = [h for h in health if h.status != 200]
    if bad:
        label = f"not 200 ({len(bad)})"
        ax.scatter([h.t for h in bad], [_ms(h) for h in bad], marker="x", color="C3", s=40, label=label)
        for h in bad[:10]:
            text = str(h.status) if h.status else "failed"
            ax.annotate(text, (h.t, _ms(h)), xytext=(4, 4), textcoords="offset points", **_SMALL)
        ax.legend(loc="lower right", **_SMALL)
    ax.set_xlabel("time since the check started (s)")
    ax.set_ylabel("/health latency (ms)")


def _plot_fps(fig: Figure, steps: list[StepResult], input_fps: float) -> None:
    if not steps:
        _no_data(fig, "no steps")
        return
    ax = fig.add_subplot()
    for i, step in enumerate(steps):
        n = len(step.fps)
        xs = [i + (k - (n - 1) / 2) * min(0.1, 0.6 / max(n, 1)) for k in range(n)]
        ax.scatter(xs, step.fps, color="C2" if step.real_time else "C3", zorder=3, s=25)
        if step.fps:
            ax.hlines(sum(step.fps) / n, i - 0.3, i + 0.3, color="0.3", lw=1)
    ax.axhline(input_fps, color="C0", label=f"input {input_fps:g} fps")
    threshold = REAL_TIME_SHARE * input_fps
    ax.axhline(threshold, color="C3", linestyle="--", label=f"real-time threshold (95 %, {threshold:g} fps)")
    ax.set_xticks(range(len(steps)), [f"{s.sessions}" + (" (refused)" if s.refused else "") for s in steps])
    ax.set_xlim(-0.6, len(steps) - 0.4)
    ax.set_ylim(bottom=0, top=max([input_fps, *(f for s in steps for f in s.fps)]) * 1.1)
    ax.set_xlabel("sessions in the step (dot: one session, bar: mean)")
    ax.set_ylabel("output fps")
    ax.legend(loc="lower left", **_SMALL)


# -- documents ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    kind: str
    """``h1``, ``h2``, ``p``, ``pre``, ``table`` or ``img``."""
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


_FIT_COLUMNS = "Resource|Base MiB|Per session MiB|Residual MiB|Total MiB|Headroom MiB|Max sessions|Total from"
_STEP_COLUMNS = (
    "Sessions|fps min|fps mean|Dropped|Latency p50 ms|Latency p99 ms|Peak RSS MiB|Real-time|Refused"
)
_EXPLANATION = (
    "For every measured resource (host memory as rss, each GPU as gpuN) a line "
    "base + per-session \u00d7 sessions is fitted through the peak memory of each step, the idle point "
    "included: base is what the container holds with no session, per-session peak is the slope of the "
    "line and residual says how far the points lie from it. total is what there is (device memory, the "
    "container's memory limit or the host's RAM) and headroom the margin kept free. The tightest "
    "resource sets --max-sessions."
)


def _blocks(result: CheckResult) -> list[_Block]:
    items = tuple(("PASS" if i.passed else "FAIL", i.name, i.summary, i.reason or "") for i in result.items)
    fits = tuple(
        (f.resource, *map(_mib, (f.base, f.per_session, f.residual, f.total, f.headroom)),
         _num(f.recommended_max_sessions, "{}"), f.total_source)
        for f in result.fits
    )  # fmt: skip
    steps = tuple(
        (str(s.sessions), _num(min(s.fps, default=None)), _num(sum(s.fps) / len(s.fps) if s.fps else None),
         str(s.dropped_frames), _num(s.latency_ms_p50), _num(s.latency_ms_p99), _mib(s.peak_rss),
         _yes(s.real_time), s.refused or "")
        for s in result.steps
    )  # fmt: skip
    shutdown = tuple(
        (s.stream_id, *map(_yes, (s.final_event, s.last_segment_complete, s.channel_closed, s.clean)))
        for s in result.shutdown
    )
    return [
        _Block("h1", f"byoc check — {result.processor}"),
        _Block(
            "p",
            f"Checked {result.container_url} at {result.started_at} "
            f"({'with GPU' if result.gpu else 'CPU only'}, input {result.input_fps:g} fps): "
            f"{_verdict(result)}.",
        ),
        _Block("h2", "Checklist"),
        _Block("table", header=("Result", "Item", "Summary", "Reason"), rows=items),
        _Block("h2", "Recommendation"),
        _Block("p", _recommendation(result) + "."),
        _Block("table", header=tuple(_FIT_COLUMNS.split("|")), rows=fits),
        _Block("pre", FORMULA),
        _Block("p", _EXPLANATION),
        _Block("h2", "Steps"),
        _Block("table", header=tuple(_STEP_COLUMNS.split("|")), rows=steps),
        _Block("h2", "Shutdown"),
        _Block(
            "table",
            header=("Session", "Final event", "Last segment complete", "Channel closed", "Clean"),
            rows=shutdown,
        ),
        _Block("h2", "Plots"),
        _Block("img", "memory.png", header=("Peak memory versus sessions, with the fitted line",)),
        _Block("img", "health.png", header=("/health latency over time; the steps are shaded",)),
        _Block("img", "fps.png", header=("Output fps of every session per step",)),
    ]


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.pass, td.yes { color: #176b2c; font-weight: 600; }
td.fail, td.no { color: #b3261e; font-weight: 600; }
pre { background: #f6f6f6; padding: 0.6rem; }
img { max-width: 100%; border: 1px solid #ddd; }
"""

_CELL_CLASS = {"PASS": "pass", "FAIL": "fail", "yes": "yes", "no": "no"}


def _html(blocks: list[_Block], title: str, footer: str) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_STYLE}</style></head>",
        "<body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "p", "pre"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "img":
            out.append(
                f'<figure><img src="{e(b.text)}" alt="{e(b.header[0])}">'
                f"<figcaption>{e(b.header[0])}</figcaption></figure>"
            )
        elif b.kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead>")
            out.append("<tbody>")
            for row in b.rows:
                cells = []
                for cell in row:
                    css = _CELL_CLASS.get(cell)
                    cells.append(f'<td class="{css}">{e(cell)}</td>' if css else f"<td>{e(cell)}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            if not b.rows:
                out.append(f'<tr><td colspan="{len(b.header)}">none</td></tr>')
            out.append("</tbody></table>")
    out += [f"<footer><p>{e(footer)}</p></footer>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&])")


def _md(text: str) -> str:
    """One line of Markdown text: whitespace collapsed, markup characters and HTML escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _markdown(blocks: list[_Block], footer: str) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out += [f"# {_md(b.text)}", ""]
        elif b.kind == "h2":
            out += [f"## {_md(b.text)}", ""]
        elif b.kind == "p":
            out += [_md(b.text), ""]
        elif b.kind == "pre":
            out += ["```", b.text.replace("`", "'"), "```", ""]
        elif b.kind == "img":
            out += [f"![{_md(b.header[0])}]({b.text})", ""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in b.rows]
            if not b.rows:
                out.append("| none |" + " |" * (len(b.header) - 1))
            out.append("")
    out += [_md(footer), ""]
    return "\n".join(out)


def write_report(result: CheckResult, directory: Path) -> list[Path]:
    """Write ``index.html``, ``report.md`` and the plots ``memory.png``, ``health.png`` and ``fps.png``
    into ``directory`` (created if needed) and return their paths.

    Raises :class:`~byoc.errors.ConfigError` when matplotlib is not installed.
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            f"the byoc check report needs matplotlib ({exc}); "
            "install it with: pip install 'byoc-runtime[report]'"
        ) from exc

    directory.mkdir(parents=True, exist_ok=True)

    def save(name: str, size: tuple[float, float], draw: Callable[[Figure], None]) -> Path:
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)  # drawn by Agg, whatever backend pyplot is set to
        try:
            draw(fig)
            fig.savefig(directory / name, dpi=100, format="png")
        finally:
            fig.clear()
        return directory / name

    written = [
        save("memory.png", (5.5 * max(1, len(result.fits)), 4.2), lambda f: _plot_memory(f, result.fits)),
        save("health.png", (10.0, 4.0), lambda f: _plot_health(f, result.health, result.steps)),
        save(
            "fps.png",
            (max(6.0, 1.2 * len(result.steps) + 3), 4.2),
            lambda f: _plot_fps(f, result.steps, result.input_fps),
        ),
    ]
    blocks = _blocks(result)
    footer = f"Written by byoc check; plots made with matplotlib {matplotlib.__version__}."
    index = directory / "index.html"
    index.write_text(_html(blocks, blocks[0].text, footer), encoding="utf-8")
    markdown = directory / "report.md"
    markdown.write_text(_markdown(blocks, footer), encoding="utf-8")
    return [*written, index, markdown]
