"""Stream parameters: one validator for a start, a ``/stream/params`` request and the control channel."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from byoc.errors import InvalidRequest
from byoc.params import check_update, max_fps
from byoc.serve.validation import params_update, start_spec

BAD_MAX_FPS: list[Any] = [0, -3, 120.5, 500, math.nan, math.inf, "15", "fast", True, [15], {"fps": 15}]
GOOD_MAX_FPS: list[tuple[Any, float | None]] = [(15, 15.0), (0.5, 0.5), (120, 120.0), (None, None)]
_START = {"control_url": "http://o/c", "events_url": "http://o/e", "gateway_request_id": "s1"}


@pytest.mark.parametrize("value", BAD_MAX_FPS, ids=repr)
def test_a_bad_max_fps_is_refused_on_every_path(value: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        max_fps(value)
    assert refused.value.field == "params.max_fps"
    with pytest.raises(InvalidRequest, match=r"params\.max_fps"):
        check_update({"prompt": "a cat", "max_fps": value})  # what the session checks
    if not (isinstance(value, float) and not math.isfinite(value)):  # JSON has no NaN or infinity
        with pytest.raises(InvalidRequest, match=r"params\.max_fps"):
            params_update(json.dumps({"max_fps": value}).encode())  # what /stream/params checks
        with pytest.raises(InvalidRequest, match=r"params\.max_fps"):
            start_spec({**_START, "params": {"max_fps": value}}, header_id=None)


@pytest.mark.parametrize(("value", "cap"), GOOD_MAX_FPS, ids=repr)
def test_a_good_max_fps_is_the_cap_and_null_removes_it(value: Any, cap: float | None) -> None:
    assert max_fps(value) == cap
    update = {"max_fps": value, "prompt": "a cat"}
    assert check_update(update) == update
    assert params_update(json.dumps(update).encode()) == update
    assert start_spec({**_START, "params": {"max_fps": value}}, header_id=None).max_fps == cap


def test_keys_byoc_does_not_act_on_pass_as_they_are() -> None:
    update = {"strength": "high", "max_fps_hint": -1, "nested": {"max_fps": 0}}
    assert check_update(update) == update
    assert check_update({}) == {}
