"""The vLLM connector's settings: ``ConnectorConfig.from_sources`` over ``kv_connector_extra_config``
and the environment (no vLLM, no server)."""

from __future__ import annotations

import dataclasses

import pytest

from kvloft.config import default_socket_path
from kvloft.vllm.config import LOAD_MODES, MODES, ConnectorConfig


def test_defaults() -> None:
    config = ConnectorConfig.from_sources(None, env={})
    assert config == ConnectorConfig(socket_path=default_socket_path())
    assert config.mode == "read_write" and config.loads and config.saves
    assert config.request_timeout_s == 1.0 and config.load_timeout_s == 30.0
    assert (config.reconnect_initial_s, config.reconnect_max_s) == (0.5, 10.0)
    assert config.min_lookup_blocks == 1
    assert ConnectorConfig.from_sources({}, env={}) == config


def test_socket_path_falls_back_to_kvloft_socket() -> None:
    assert ConnectorConfig.from_sources({}, env={"KVLOFT_SOCKET": "/tmp/a.sock"}).socket_path == "/tmp/a.sock"
    # Its own variable, then the extra config, win over $KVLOFT_SOCKET.
    env = {"KVLOFT_SOCKET": "/tmp/a.sock", "KVLOFT_SOCKET_PATH": "/tmp/b.sock"}
    assert ConnectorConfig.from_sources({}, env=env).socket_path == "/tmp/b.sock"
    assert ConnectorConfig.from_sources({"socket_path": "/tmp/c.sock"}, env=env).socket_path == "/tmp/c.sock"


def test_environment_sets_every_key_and_converts_types() -> None:
    env = {
        "KVLOFT_MODE": "save_only",
        "KVLOFT_REQUEST_TIMEOUT_S": "2.5",
        "KVLOFT_LOAD_TIMEOUT_S": "7",
        "KVLOFT_RECONNECT_INITIAL_S": "0.25",
        "KVLOFT_RECONNECT_MAX_S": "4",
        "KVLOFT_MIN_LOOKUP_BLOCKS": "3",
    }
    config = ConnectorConfig.from_sources(None, env=env)
    assert config.mode == "save_only" and config.loads is False and config.saves is True
    assert config.request_timeout_s == 2.5 and isinstance(config.request_timeout_s, float)
    assert config.load_timeout_s == 7.0 and isinstance(config.load_timeout_s, float)
    assert (config.reconnect_initial_s, config.reconnect_max_s) == (0.25, 4.0)
    assert config.min_lookup_blocks == 3 and isinstance(config.min_lookup_blocks, int)


def test_empty_environment_variable_is_ignored() -> None:
    config = ConnectorConfig.from_sources(None, env={"KVLOFT_MODE": "", "KVLOFT_LOAD_TIMEOUT_S": ""})
    assert config.mode == "read_write" and config.load_timeout_s == 30.0


def test_extra_config_overrides_environment() -> None:
    env = {"KVLOFT_MODE": "save_only", "KVLOFT_LOAD_TIMEOUT_S": "7", "KVLOFT_MIN_LOOKUP_BLOCKS": "3"}
    config = ConnectorConfig.from_sources({"mode": "load_only", "load_timeout_s": 2}, env=env)
    assert config.mode == "load_only" and config.loads is True and config.saves is False
    assert config.load_timeout_s == 2.0
    assert config.min_lookup_blocks == 3  # not in the extra config: from the environment


def test_env_argument_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVLOFT_MODE", "save_only")
    assert ConnectorConfig.from_sources(None, env={}).mode == "read_write"
    assert ConnectorConfig.from_sources(None).mode == "save_only"


@pytest.mark.parametrize("mode", MODES)
def test_modes(mode: str) -> None:
    config = ConnectorConfig.from_sources({"mode": mode}, env={})
    assert (config.loads, config.saves) == (mode != "save_only", mode != "load_only")


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("mdoe", "mode"), ("load_timeout", "load_timeout_s"), ("min_lookup_block", "min_lookup_blocks")],
)
def test_unknown_key_names_the_closest_key(typo: str, meant: str) -> None:
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources({typo: 1}, env={})
    message = str(e.value)
    assert repr(typo) in message
    assert f"did you mean {meant!r}?" in message
    assert "known keys:" in message and "socket_path" in message


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources({"zzzzzz": 1, "mdoe": "x"}, env={})
    message = str(e.value)
    assert "'zzzzzz'" in message and "'mdoe' (did you mean 'mode'?)" in message
    assert "did you mean" not in message.split("'zzzzzz'")[1].split(",")[0]
    for field in dataclasses.fields(ConnectorConfig):
        assert field.name in message


def test_bad_mode_is_refused_naming_the_modes() -> None:
    for source in ({"mode": "write_only"}, None):
        env = {"KVLOFT_MODE": "write_only"} if source is None else {}
        with pytest.raises(ValueError) as e:
            ConnectorConfig.from_sources(source, env=env)
        message = str(e.value)
        assert "mode" in message and "'write_only'" in message
        assert all(m in message for m in MODES)


def test_load_modes() -> None:
    assert ConnectorConfig.from_sources(None, env={}).load_mode == "async"
    assert ConnectorConfig.from_sources({"load_mode": "sync"}, env={}).load_mode == "sync"
    assert ConnectorConfig.from_sources(None, env={"KVLOFT_LOAD_MODE": "sync"}).load_mode == "sync"
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources({"load_mode": "layerwise"}, env={})
    message = str(e.value)
    assert "load_mode" in message and "'layerwise'" in message
    assert all(m in message for m in LOAD_MODES)


@pytest.mark.parametrize(
    "key", ["request_timeout_s", "load_timeout_s", "reconnect_initial_s", "reconnect_max_s"]
)
@pytest.mark.parametrize("value", [0, -1.5, float("nan")])
def test_timeouts_must_be_positive(key: str, value: float) -> None:
    extra = {key: value}
    if key == "reconnect_initial_s":
        extra["reconnect_max_s"] = 100.0
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources(extra, env={})
    assert key in str(e.value) and "positive" in str(e.value)


def test_reconnect_max_below_initial_is_refused() -> None:
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources({"reconnect_initial_s": 5, "reconnect_max_s": 1}, env={})
    assert "reconnect_max_s" in str(e.value) and "reconnect_initial_s" in str(e.value)
    config = ConnectorConfig.from_sources({"reconnect_initial_s": 2, "reconnect_max_s": 2}, env={})
    assert config.reconnect_max_s == config.reconnect_initial_s == 2.0


@pytest.mark.parametrize("value", [0, -2])
def test_min_lookup_blocks_must_be_at_least_one(value: int) -> None:
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources({"min_lookup_blocks": value}, env={})
    assert "min_lookup_blocks" in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("request_timeout_s", "fast", "a number"),
        ("load_timeout_s", True, "a number"),
        ("load_timeout_s", None, "a number"),
        ("reconnect_max_s", [1], "a number"),
        ("min_lookup_blocks", 2.5, "a whole number"),
        ("min_lookup_blocks", "2.5", "a whole number"),
        ("min_lookup_blocks", False, "a whole number"),
        ("mode", 3, "a string"),
        ("socket_path", b"/tmp/x.sock", "a string"),
    ],
)
def test_wrong_types_are_refused_naming_the_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources({key: value}, env={})
    message = str(e.value)
    assert f"kv_connector_extra_config[{key!r}]" in message
    assert f"must be {expected}" in message and repr(value) in message


def test_wrong_type_from_environment_names_the_variable() -> None:
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources(None, env={"KVLOFT_LOAD_TIMEOUT_S": "soon"})
    assert "$KVLOFT_LOAD_TIMEOUT_S must be a number" in str(e.value) and "'soon'" in str(e.value)
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources(None, env={"KVLOFT_MIN_LOOKUP_BLOCKS": "many"})
    assert "$KVLOFT_MIN_LOOKUP_BLOCKS must be a whole number" in str(e.value)


def test_whole_float_is_a_whole_number() -> None:
    assert ConnectorConfig.from_sources({"min_lookup_blocks": 4.0}, env={}).min_lookup_blocks == 4


def test_empty_socket_path_is_refused() -> None:
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_sources({"socket_path": ""}, env={})
    assert "socket_path" in str(e.value)
