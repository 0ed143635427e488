"""The photo encoder's share of a core while other requests are in flight: the hook that
paces it (`Yielding`) and the count it reads (`InFlight`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from components.service.app import InFlight
from components.service.photo_encoder import PhotoEncoder, Yielding


class Simulated:
    """A process's wall and CPU clocks: `run` spends CPU, `sleep` only wall time."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.slept = 0.0
        self.sleeps = 0

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.cpu += seconds

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "slept for nothing"
        self.wall += seconds
        self.slept += seconds
        self.sleeps += 1


def _hook(clocks: Simulated, foreground, share: float) -> Yielding:
    return Yielding(
        foreground,
        share,
        clock=lambda: clocks.wall,
        cpu=lambda: clocks.cpu,
        sleep=clocks.sleep,
    )


@pytest.mark.parametrize("share", [0.05, 0.25, 0.6])
def test_photos_take_their_share_of_a_core_while_other_requests_are_in_flight(share):
    clocks, foreground = Simulated(), SimpleNamespace(value=2)
    hook = _hook(clocks, foreground, share)
    for _ in range(2_000):  # modules of 1.5 ms each
        clocks.run(0.0015)
        hook()

    taken = clocks.cpu / clocks.wall
    assert share * 0.97 <= taken <= share * 1.03, f"photos took {taken:.3f} of a core"


def test_photos_run_freely_with_nothing_else_in_flight():
    clocks, foreground = Simulated(), SimpleNamespace(value=0)
    hook = _hook(clocks, foreground, 0.1)
    for _ in range(1_000):
        clocks.run(0.002)
        hook()
    assert clocks.slept == 0.0


def test_a_paced_photo_goes_on_as_soon_as_nothing_else_is_in_flight():
    clocks, foreground = Simulated(), SimpleNamespace(value=1)
    hook = _hook(clocks, foreground, 0.01)
    clocks.run(0.03)  # a long module: 3 s of rest owed at 1%
    sleep = clocks.sleep

    def last_request_ends(seconds: float) -> None:
        sleep(seconds)
        foreground.value = 0

    clocks.sleep = last_request_ends
    hook.sleep = last_request_ends
    hook()
    assert clocks.sleeps == 1 and clocks.slept <= hook.poll_s  # not the 3 s owed


def test_a_share_outside_0_to_1_is_refused_naming_the_key():
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="serve.photo_share"):
            PhotoEncoder("normal", "cpu", share)


def test_requests_in_flight_are_counted_but_photo_searches():
    count, seen = SimpleNamespace(value=0), []

    async def app(scope, receive, send) -> None:
        seen.append((scope["method"], scope["path"], count.value))
        if scope["path"] == "/fails":
            raise RuntimeError("the handler failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    client = TestClient(InFlight(app, "/search/image", count), raise_server_exceptions=False)
    client.get("/search", params={"q": "lamp"})
    client.post("/search/image", content=b"photo")
    client.get("/search/image")  # not a photo search: counted
    client.get("/fails")
    behind_a_proxy = TestClient(InFlight(app, "/search/image", count), root_path="/api")
    behind_a_proxy.post("/api/search/image", content=b"photo")  # the prefix in its path

    assert seen == [
        ("GET", "/search", 1),
        ("POST", "/search/image", 0),
        ("GET", "/search/image", 1),
        ("GET", "/fails", 1),
        ("POST", "/api/search/image", 0),
    ]
    assert count.value == 0, "a request left counted after it ended"
