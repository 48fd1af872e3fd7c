"""The connector's link: a refused registration is an error reported once per back-off period."""

from __future__ import annotations

import pytest
from support import make_namespace

import kvloft
from kvloft.vllm.link import Link

pytestmark = pytest.mark.server


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refused_registration_raises_once_per_backoff(server: str) -> None:
    with kvloft.Client(server) as other:
        other.register_instance("inst", make_namespace(model="a"))
        clock = Clock()
        link = Link(server, "inst", make_namespace(model="b"), backoff=(1.0, 4.0), clock=clock)
        with pytest.raises(kvloft.ServerError) as e:
            link.client()
        assert e.value.code == "mismatch"
        assert link.client() is None, "within the back-off the link neither retries nor raises"
        clock.now += 1.5
        with pytest.raises(kvloft.ServerError):
            link.client()
        clock.now += 1.5
        assert link.client() is None, "the back-off doubled to 2 s"
    # The conflicting registration is gone with its connection: the link registers.
    clock.now += 10
    assert link.client() is not None and link.up


def test_unreachable_server_is_none_until_it_answers(sock_dir: str) -> None:
    clock = Clock()
    link = Link(f"{sock_dir}/absent.sock", "inst", make_namespace(), backoff=(0.5, 2.0), clock=clock)
    assert link.client() is None
    assert link.client() is None
    assert not link.up
