"""Connector configuration: ``kv_connector_extra_config`` keys and environment variables.

Every key may also come from an environment variable (``KVLOFT_`` plus the key in capitals,
for instance ``KVLOFT_MODE=save_only``); a key in ``kv_connector_extra_config`` wins over the
environment, and the socket path falls back to ``$KVLOFT_SOCKET`` as for every kvloft client.
Unknown keys are refused with the closest known key named, so a typo is not silently ignored.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..config import default_socket_path

#: What the connector does with kvloft.
MODES = ("read_write", "save_only", "load_only")
#: When a hit is loaded: while the request waits outside the batch, or in the step that runs it.
LOAD_MODES = ("async", "sync")


@dataclass(frozen=True)
class ConnectorConfig:
    """The connector's settings (see ``docs/src/vllm.md`` for the reference)."""

    #: The kvloft server's Unix socket.
    socket_path: str
    #: ``read_write`` (look up, load and save), ``save_only`` (never load) or ``load_only``
    #: (never save).
    mode: str = "read_write"
    #: Seconds one request to kvloft may take before the connector treats kvloft as down
    #: (lookups, save and load submissions, registrations).
    request_timeout_s: float = 1.0
    #: Seconds a load may take from submission to its completion; after that the request's
    #: blocks are recomputed.
    load_timeout_s: float = 30.0
    #: First wait before reconnecting after kvloft went away; doubled after every failed
    #: attempt up to ``reconnect_max_s``.
    reconnect_initial_s: float = 0.5
    #: Longest wait between reconnection attempts.
    reconnect_max_s: float = 10.0
    #: Fewest blocks worth a lookup: prompts with fewer full blocks are not looked up.
    min_lookup_blocks: int = 1
    #: ``async``: a request with a hit waits outside the batch until its load completed.
    #: ``sync``: it runs in the step that loads it; on a GPU each attention layer waits (on the
    #: GPU) only for its own layer's copy, so later layers load while earlier ones compute.
    load_mode: str = "async"

    @property
    def loads(self) -> bool:
        """Whether the connector looks prefixes up and loads them."""
        return self.mode != "save_only"

    @property
    def saves(self) -> bool:
        """Whether the connector saves newly computed blocks."""
        return self.mode != "load_only"

    @classmethod
    def from_sources(cls, extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> ConnectorConfig:
        """Builds the settings from ``kv_connector_extra_config`` and the environment.

        Raises ``ValueError`` naming the key, what was wrong and how to fix it.
        """
        env = os.environ if env is None else env
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"kvloft connector: unknown kv_connector_extra_config key(s) {', '.join(hints)}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            env_name = "KVLOFT_" + f.name.upper()
            if f.name in extra:
                raw, where = extra[f.name], f"kv_connector_extra_config[{f.name!r}]"
            elif env.get(env_name):
                raw, where = env[env_name], f"${env_name}"
            else:
                continue
            values[f.name] = _convert(f.name, raw, where)
        if "socket_path" not in values:
            values["socket_path"] = env.get("KVLOFT_SOCKET") or default_socket_path()
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raises ``ValueError`` for a value out of range."""
        if self.mode not in MODES:
            raise ValueError(f"kvloft connector: mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.load_mode not in LOAD_MODES:
            raise ValueError(
                f"kvloft connector: load_mode {self.load_mode!r} is unknown; use one of {', '.join(LOAD_MODES)}"
            )
        if not self.socket_path:
            raise ValueError("kvloft connector: socket_path is empty; name the socket `kvloft serve` listens on")
        for name in ("request_timeout_s", "load_timeout_s", "reconnect_initial_s", "reconnect_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"kvloft connector: {name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("kvloft connector: reconnect_max_s must be at least reconnect_initial_s")
        if self.min_lookup_blocks < 1:
            raise ValueError(f"kvloft connector: min_lookup_blocks must be at least 1, got {self.min_lookup_blocks}")


def _convert(name: str, raw: Any, where: str) -> Any:
    kind = {f.name: f.type for f in fields(ConnectorConfig)}[name]
    try:
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except (TypeError, ValueError):
        expected = {"float": "a number", "int": "a whole number", "str": "a string"}[kind]
        raise ValueError(f"kvloft connector: {where} must be {expected}, got {raw!r}") from None
