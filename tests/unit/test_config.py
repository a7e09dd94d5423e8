"""Settings: one object, from flags over environment variables over defaults."""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from byoc.errors import ConfigError
from byoc.media.encoder import EncoderSettings
from byoc.serve.config import DrainBudget, Settings, build_parser, settings_from, warn_secret_flags


def test_help_documents_every_setting_with_its_environment_variable() -> None:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser(environ={}).parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    for field in dataclasses.fields(Settings):
        assert f"BYOC_{field.name.upper()}" in text, field.name
        if field.name != "processor":
            assert "--" + field.name.replace("_", "-") in text, field.name


def test_flags_win_over_environment_over_defaults() -> None:
    environ = {
        "BYOC_MAX_SESSIONS": "7",
        "BYOC_PORT": "9001",
        "BYOC_INSECURE_TLS": "yes",
        "BYOC_PROCESSOR": "invert",
    }
    settings = settings_from(["--port", "9002"], environ)
    assert (settings.max_sessions, settings.port, settings.insecure_tls, settings.processor) == (
        7,
        9002,
        True,
        "invert",
    )
    assert settings_from([], {}).max_sessions == Settings().max_sessions
    options = settings_from(["--processor-option", "ms=5", "--processor-option", "mode=async"], {})
    assert options.processor_options == {"ms": "5", "mode": "async"}
    from_env = settings_from([], {"BYOC_PROCESSOR_OPTION": "ms=5,memory_mb=64"})
    assert from_env.processor_options == {"ms": "5", "memory_mb": "64"}


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-sessions", "0"], {}, "max_sessions"),
        (["--segment-s", "3"], {}, "segment_s"),
        (["--orchestrator-url", "https://o:8935"], {}, "orch_secret"),
        (["--processor-option", "novalue"], {}, "KEY=VALUE"),
        (["--stop-answer-timeout-s", "-1"], {}, "stop_answer_timeout_s"),
        ([], {"BYOC_MAX_SESSIONS": "many"}, "BYOC_MAX_SESSIONS"),
    ],
)
def test_bad_settings_say_what_is_wrong(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from(argv, environ)


def test_secrets_stay_out_of_repr_and_can_come_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    settings = Settings(orchestrator_url="https://o", orch_secret_file=secret_file, token="t0p")
    assert settings.secret() == "from-a-file"
    assert "t0p" not in repr(settings)
    assert "from-a-file" not in repr(settings)
    assert "hunter2" not in repr(Settings(orchestrator_url="https://o", orch_secret="hunter2"))


def test_advertised_url_has_no_trailing_slash() -> None:
    assert Settings(capability_url="http://c:8000/").advertised_url() == "http://c:8000"
    assert Settings(port=8123).advertised_url() == "http://localhost:8123"


def test_media_defaults_live_in_the_encoder_settings() -> None:
    assert Settings().encoder() == EncoderSettings()
    session = Settings(segment_s=0.5, preset="veryfast", crf=30).session()
    assert session.encoder == EncoderSettings(segment_s=0.5, preset="veryfast", crf=30)


@pytest.mark.parametrize(
    ("total", "unregister", "session"), [(8.0, 2.0, 6.0), (4.0, 1.0, 2.0), (2.0, 0.5, 1.0)]
)
def test_one_drain_budget_splits_the_drain_timeout(total: float, unregister: float, session: float) -> None:
    settings = Settings(drain_timeout_s=total)
    budget = settings.drain_budget()
    assert (budget.total_s, budget.unregister_s, budget.session_s) == (total, unregister, session)
    assert settings.session().drain_timeout_s == budget.session_s  # each session drains within its share
    assert budget.unregister_s + budget.session_s <= total
    # the runtime waits for the sessions, cancels, then tears down, each a little before the deadline
    assert budget.sessions_wait_s(3.0) < budget.cancel_wait_s(3.0) < budget.teardown_wait_s(3.0) < 3.0
    assert DrainBudget.from_total(total) == budget


def test_a_stop_waits_for_the_final_event_at_most_as_long_as_the_session_may_take_to_end() -> None:
    assert Settings().stop_answer_s() == 3.0
    assert Settings(drain_timeout_s=4.0, stop_answer_timeout_s=5.0).stop_answer_s() == 2.0  # its share
    assert Settings(stop_answer_timeout_s=0).stop_answer_s() == 0.0  # answered at once


def test_secret_files_must_be_readable_and_not_empty_and_secrets_given_once(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-a-file\n")
    assert Settings(token_file=token_file).bearer_token() == "from-a-file"
    assert Settings(token="direct").bearer_token() == "direct"
    token_file.write_text("\n")  # an empty token would silently turn authentication off
    with pytest.raises(ConfigError, match=r"token_file .* is empty"):
        Settings(token_file=token_file)
    with pytest.raises(ConfigError, match="cannot read orch_secret_file"):
        Settings(orchestrator_url="https://o", orch_secret_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="token or token_file, not both"):
        settings_from(["--token", "a", "--token-file", str(token_file)], {})


def test_allowed_channel_hosts_from_flags_or_environment() -> None:
    from_flags = settings_from(
        ["--allowed-channel-hosts", "orch:8935,[::1]", "--allowed-channel-hosts", "b"], {}
    )
    assert [str(rule) for rule in from_flags.channel_host_rules()] == ["orch:8935", "::1", "b"]
    from_env = settings_from([], {"BYOC_ALLOWED_CHANNEL_HOSTS": "Orch.Example.,*"})
    assert [str(rule) for rule in from_env.channel_host_rules()] == ["orch.example", "*"]
    assert Settings().channel_host_rules() == ()
    with pytest.raises(ConfigError, match="allowed_channel_hosts"):
        settings_from(["--allowed-channel-hosts", "http://orch/path"], {})


def test_secret_flags_are_warned_about_and_the_environment_is_not(caplog: pytest.LogCaptureFixture) -> None:
    flags = warn_secret_flags(["--orch-secret=s3cret", "--token", "t0ken", "--max-sessions", "2"])
    assert flags == ["--token", "--orch-secret"]
    assert all("s3cret" not in r.getMessage() and "t0ken" not in r.getMessage() for r in caplog.records)
    assert "use --token-file or the environment variable BYOC_TOKEN" in caplog.records[0].getMessage()
    assert warn_secret_flags(["--orch-secret-file", "/run/secrets/orch"]) == []
