"""The local orchestrator's live-runner side in-process, driven over loopback HTTP as runners and clients
drive go-livepeer's: registration by heartbeat, its refusals, capacity, hiding, unregistering, expiry, the
O2R channel and the session callbacks."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.runner_support import RUNNER, SECRET, call, o2r_reader, orchestrator, register


async def test_registration_and_heartbeats_answer_like_go_livepeer(http: aiohttp.ClientSession) -> None:
    async with orchestrator() as orch:
        url = f"{orch.base_url}/runners/heartbeat"
        assert (await call(http, "POST", url, RUNNER, Authorization="wrong"))[0] == 401
        assert not orch.runners.runners
        first = await register(http, orch, runner_id="r1")
        assert first["runner_id"] == "r1"
        assert first["orchestrator"] == orch.base_url
        assert (first["heartbeat_interval"], first["heartbeat_ttl"]) == ("5s", "20s")
        assert first["session_ids"] == []
        o2r = first["o2r"]
        assert (o2r["name"], o2r["mime_type"]) == ("o2r", "application/json")
        assert o2r["channel_name"].startswith("r1-")
        assert o2r["channel_name"].endswith("-o2r")
        assert o2r["url"] == f"{orch.base_url}/ai/trickle/{o2r['channel_name']}"
        assert orch.trickle.has_channel(o2r["channel_name"])
        secret = first["heartbeat_secret"]
        assert secret not in ("", SECRET)
        # later heartbeats: the heartbeat secret only; no secret or O2R channel again
        again = {**RUNNER, "runner_id": "r1", "capacity": 3, "version": "1.2"}
        assert (await call(http, "POST", url, again, Authorization=SECRET))[0] == 401
        status, answer = await call(http, "POST", url, again, Authorization=secret)
        assert status == 200
        assert set(answer) == {
            "runner_id",
            "orchestrator",
            "heartbeat_interval",
            "heartbeat_ttl",
            "session_ids",
        }
        assert orch.runners.runners["r1"].info.capacity == 3
        # without a runner_id the orchestrator makes one up
        other = await register(http, orch)
        assert other["runner_id"].startswith("runner_")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"runner_url": "/relative"}, "runner_url"),
        ({"runner_url": "ftp://host/x"}, "runner_url"),
        ({"runner_url": "http://"}, "runner_url"),
        ({"app": None}, "app"),
        ({"app": " padded"}, "app"),
        ({"metadata": "x" * 1025}, "metadata"),
        ({"metadata": "\ud800"}, "metadata"),
        ({"status": "Ready"}, "status"),
        ({"status": " ready"}, "status"),
        ({"mode": "batch"}, "mode"),
        ({"capacity": -1}, "capacity"),
        ({"capacity": "2"}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"proxy": "yes"}, "proxy"),
        ({"gpu": "H100"}, "gpu"),
        ({"session_ids": "s1"}, "session_ids"),
        ({"price_info": {"price": "cheap"}}, "Number"),
    ],
)
async def test_bad_heartbeat_bodies_are_400_and_register_nothing(
    http: aiohttp.ClientSession, change: dict[str, Any], reason: str
) -> None:
    async with orchestrator() as orch:
        body = {k: v for k, v in {**RUNNER, **change}.items() if v is not None}
        status, text = await call(
            http, "POST", f"{orch.base_url}/runners/heartbeat", body, Authorization=SECRET
        )
        assert status == 400
        assert reason in text
        assert not orch.runners.runners
        assert orch.trickle.channel_names() == []


async def test_heartbeat_body_edges_go_livepeer_accepts(http: aiohttp.ClientSession) -> None:
    async with orchestrator() as orch:
        url = f"{orch.base_url}/runners/heartbeat"
        for body in (b"not json", b"[1]"):
            assert (await call(http, "POST", url, body, Authorization=SECRET))[0] == 400
        answer = await register(
            http, orch, metadata="é" * 512, capacity=0, mode="single_shot", gpu=0, unknown_key=[1]
        )
        info = orch.runners.runners[answer["runner_id"]].info
        assert (info.capacity, info.mode, info.gpu, len(info.metadata.encode())) == (
            1,
            "single-shot",
            {"id": "0"},
            1024,
        )


async def test_capacity_is_503_when_full_and_frees_on_stop(http: aiohttp.ClientSession) -> None:
    async with orchestrator() as orch:
        runner_id = (await register(http, orch, capacity=1))["runner_id"]
        reserve = f"{orch.base_url}/apps/{runner_id}/session"
        status, session = await call(http, "POST", reserve, {})
        assert status == 200
        sid = session["session_id"]
        assert session["control_url"] == f"{reserve}/{sid}"
        assert session["app_url"] == f"{reserve}/{sid}/app"
        assert await call(http, "POST", reserve, {}) == (503, "no capacity available for runner\n")
        _, discovered = await call(http, "GET", f"{orch.base_url}/discovery")
        [entry] = discovered
        assert entry["address"] == orch.base_url
        [runner] = entry["runners"]
        assert runner["url"] == reserve  # never the private runner_url
        assert (runner["capacity"], runner["capacity_used"], runner["capacity_available"]) == (1, 1, 0)
        assert (await call(http, "POST", f"{session['control_url']}/stop"))[0] == 204
        assert (await call(http, "POST", reserve, {}))[0] == 200
        assert (await call(http, "POST", f"{orch.base_url}/apps/nobody/session", {}))[0] == 404


async def test_a_runner_that_is_not_ready_is_hidden_but_keeps_its_sessions(
    http: aiohttp.ClientSession,
) -> None:
    async with orchestrator() as orch:
        first = await register(http, orch, runner_id="r1", capacity=2)
        async with o2r_reader(first["o2r"]["url"], http) as o2r:
            _, session = await call(http, "POST", f"{orch.base_url}/apps/r1/session", {})
            beat = {**RUNNER, "runner_id": "r1", "capacity": 2, "status": "draining"}
            heartbeat = f"{orch.base_url}/runners/heartbeat"
            status, answer = await call(
                http, "POST", heartbeat, beat, Authorization=first["heartbeat_secret"]
            )
            assert (status, answer["session_ids"]) == (200, [session["session_id"]])
            assert await call(http, "GET", f"{orch.base_url}/discovery") == (
                200,
                [{"address": orch.base_url}],
            )
            assert (await call(http, "POST", f"{orch.base_url}/apps/r1/session", {}))[0] == 404
            beat["status"] = "ready"
            status, answer = await call(
                http, "POST", heartbeat, beat, Authorization=first["heartbeat_secret"]
            )
            assert answer["session_ids"] == [session["session_id"]]  # never released
            assert o2r.events() == [("reserved", session["session_id"])]
            assert (await call(http, "POST", f"{orch.base_url}/apps/r1/session", {}))[0] == 200


async def test_unregister_releases_every_session_and_closes_the_o2r_channel(
    http: aiohttp.ClientSession,
) -> None:
    async with orchestrator() as orch:
        first = await register(http, orch, runner_id="r1", capacity=2)
        secret = first["heartbeat_secret"]
        async with o2r_reader(first["o2r"]["url"], http) as o2r:
            sids = [
                (await call(http, "POST", f"{orch.base_url}/apps/r1/session", {}))[1]["session_id"]
                for _ in "ab"
            ]
            token = orch.runners.runners["r1"].session_token(sids[0])
            channels = f"{orch.base_url}/runner/r1/session/{sids[0]}/channels"
            body = {"channels": [{"name": "events", "mime_type": "application/json"}]}
            assert (await call(http, "POST", channels, body, **{"Livepeer-Session-Token": token}))[0] == 200
            assert orch.trickle.has_channel(f"{sids[0]}-events")
            unregister = f"{orch.base_url}/runners/r1/unregister"
            assert (await call(http, "POST", unregister, Authorization=SECRET))[0] == 401
            assert (await call(http, "POST", unregister, Authorization=secret))[0] == 204
            await o2r.wait(lambda r: r.ended)
            # as in go-livepeer the O2R channel closes first: the reservations were told, the releases not
            assert o2r.events() == [("reserved", s) for s in sids]
            assert all(isinstance(m.get("timestamp"), str) for m in o2r.messages)
        assert orch.trickle.channel_names() == []  # the sessions' channels and the O2R channel
        assert (await call(http, "POST", unregister, Authorization=secret))[0] == 404
        assert (await call(http, "POST", f"{orch.base_url}/apps/r1/session", {}))[0] == 404
        # its secret is worthless now: an unknown runner registers afresh, with the orchestrator's secret
        beat = {**RUNNER, "runner_id": "r1"}
        heartbeat = f"{orch.base_url}/runners/heartbeat"
        assert (await call(http, "POST", heartbeat, beat, Authorization=secret))[0] == 401
        assert (await register(http, orch, runner_id="r1"))["heartbeat_secret"] != secret


async def test_an_expired_runner_is_404_before_the_sweep(http: aiohttp.ClientSession) -> None:
    async with orchestrator(heartbeat_interval_s=3600.0, heartbeat_ttl_s=0.3) as orch:
        first = await register(http, orch, runner_id="r1")
        await asyncio.sleep(0.5)  # past the TTL; the sweep (hourly here) has not run
        assert await call(http, "GET", f"{orch.base_url}/discovery") == (200, [{"address": orch.base_url}])
        beat = {**RUNNER, "runner_id": "r1"}
        heartbeat = f"{orch.base_url}/runners/heartbeat"
        secret = first["heartbeat_secret"]
        assert await call(http, "POST", heartbeat, beat, Authorization=secret) == (404, "runner not found\n")
        assert (await call(http, "POST", f"{orch.base_url}/runners/r1/unregister", Authorization=secret))[
            0
        ] == 404
        assert (await call(http, "POST", f"{orch.base_url}/apps/r1/session", {}))[0] == 404


async def test_heartbeat_expiry_drops_the_runner_and_releases_its_sessions(
    http: aiohttp.ClientSession,
) -> None:
    async with orchestrator(heartbeat_interval_s=0.1, heartbeat_ttl_s=3.0) as orch:
        first = await register(http, orch, runner_id="r1")
        async with o2r_reader(first["o2r"]["url"], http) as o2r:
            _, session = await call(http, "POST", f"{orch.base_url}/apps/r1/session", {})
            token = {
                "Livepeer-Session-Token": orch.runners.runners["r1"].session_token(session["session_id"])
            }
            channels = f"{orch.base_url}/runner/r1/session/{session['session_id']}/channels"
            assert (await call(http, "POST", channels, {"channels": [{"name": "out"}]}, **token))[0] == 200
            await o2r.wait(lambda r: r.ended)
        assert "r1" not in orch.runners.runners
        assert orch.trickle.channel_names() == []  # the session's channel went with the O2R channel
        assert (await call(http, "POST", f"{session['app_url']}/x"))[0] == 404
        again = await register(http, orch, runner_id="r1")
        assert again["heartbeat_secret"] != first["heartbeat_secret"]
        assert again["session_ids"] == []


async def test_o2r_keepalives(http: aiohttp.ClientSession) -> None:
    async with orchestrator(o2r_interval_s=0.1) as orch:
        first = await register(http, orch)
        async with o2r_reader(first["o2r"]["url"], http) as o2r:
            await o2r.wait(lambda r: r.messages[:2] == [{"keep": "alive"}] * 2)


async def test_session_callbacks(http: aiohttp.ClientSession) -> None:
    async with orchestrator() as orch:
        first = await register(http, orch, runner_id="r1")
        async with o2r_reader(first["o2r"]["url"], http) as o2r:
            _, session = await call(http, "POST", f"{orch.base_url}/apps/r1/session", {})
            sid = session["session_id"]
            base = f"{orch.base_url}/runner/r1/session/{sid}"
            token = {"Livepeer-Session-Token": orch.runners.runners["r1"].session_token(sid)}
            wanted = {"channels": [{"name": "events", "mime_type": "application/json"}, {"name": "out"}]}
            assert (await call(http, "POST", f"{base}/channels", wanted))[0] == 401
            assert (await call(http, "POST", f"{base}/channels", wanted, **{"Livepeer-Session-Token": "x"}))[
                0
            ] == 401
            status, answer = await call(http, "POST", f"{base}/channels", wanted, **token)
            assert status == 200
            trickle = f"{orch.base_url}/ai/trickle/"
            assert answer["channels"] == [
                {
                    "name": "events",
                    "channel_name": f"{sid}-events",
                    "url": f"{trickle}{sid}-events",
                    "internal_url": f"{trickle}{sid}-events",
                    "mime_type": "application/json",
                },
                {
                    "name": "out",
                    "channel_name": f"{sid}-out",
                    "url": f"{trickle}{sid}-out",
                    "internal_url": f"{trickle}{sid}-out",
                    "mime_type": "application/octet-stream",
                },
            ]
            assert await call(http, "POST", f"{base}/channels", wanted, **token) == (
                200,
                answer,
            )  # idempotent
            too_many = {"channels": [{"name": f"c{i}"} for i in range(26)]}
            bad_bodies: list[object] = [too_many, {"channels": []}, {"channels": [{"name": "a b"}]}, b"{"]
            for bad in bad_bodies:
                assert (await call(http, "POST", f"{base}/channels", bad, **token))[0] == 400
            assert await call(http, "DELETE", f"{base}/channels", {"channels": ["out"]}, **token) == (
                200,
                {"deleted": ["out"]},
            )
            assert not orch.trickle.has_channel(f"{sid}-out")
            assert (await call(http, "DELETE", f"{base}/channels", {"channels": ["out"]}, **token))[0] == 404
            assert (await call(http, "POST", f"{base}/stop", **token))[0] == 204
            await o2r.wait(lambda r: ("released", sid) in r.events())
            assert not orch.trickle.has_channel(f"{sid}-events")
            assert (await call(http, "POST", f"{base}/stop", **token))[0] == 404
            assert (await call(http, "POST", f"{base}/channels", wanted, **token))[0] == 404


async def test_without_a_secret_live_runner_registration_is_off(http: aiohttp.ClientSession) -> None:
    async with orchestrator(secret="") as orch:
        status, text = await call(
            http, "POST", f"{orch.base_url}/runners/heartbeat", RUNNER, Authorization=""
        )
        assert (status, text) == (404, "dynamic live runner registration is disabled\n")
