"""``byoc check``'s HTML report in a real headless Chromium: it loads without errors and shows its
plots and tables (the report itself is made as tests/unit/test_check_report.py makes it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from byoc.dev.check.report import write_report
from tests.browser import NO_CHROMIUM, chromium_path, launch
from tests.unit.test_check_report import _result as sample_result

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(chromium_path() is None, reason=NO_CHROMIUM)]


async def test_the_check_report_loads_without_errors(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = write_report(sample_result(), tmp_path / "report")
    index = next(path for path in paths if path.name == "index.html")
    async with launch() as browser:
        page = await browser.new_page()
        await page.goto(index.as_uri())
        images = await page.evaluate(
            "[...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
        )
        assert sorted(images) == [["fps.png", True], ["health.png", True], ["memory.png", True]]
        cells = await page.evaluate("[...document.querySelectorAll('td')].map(c => c.textContent)")
        assert "PASS" in cells
        assert "FAIL" in cells
        screenshot = await page.screenshot()
        assert screenshot.startswith(b"\x89PNG\r\n\x1a\n")
        assert page.errors == []
