"""The trickle loopback demo runs end to end."""

from __future__ import annotations

import io

from byoc.dev.trickle_demo import SEGMENTS, run_demo


async def test_loopback_demo_reports_every_segment() -> None:
    out = io.StringIO()
    assert await run_demo(out) == 0
    text = out.getvalue()
    assert f"done: {SEGMENTS} segments received" in text
    assert text.index("the subscriber got the first chunk") < text.index("seq 0: complete")
    assert "end of stream" in text
