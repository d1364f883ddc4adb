"""kernels/_tuning.pick: fastest working config per key, cached; configs that fail are skipped; nothing is
timed while capturing or compiling (the default is used). Timer faked: runs on the CPU."""
import pytest

from sparserun.kernels import _tuning
from sparserun.runtime import tuning as rt_tuning


@pytest.fixture
def fake(monkeypatch):
    ms = {"a": 3.0, "b": 1.0, "c": 2.0}
    launched = []

    def launch(cfg):
        launched.append(cfg["name"])
        if cfg["name"] == "b":
            raise RuntimeError("out of shared memory")  # the fastest-looking config does not fit

    monkeypatch.setattr(rt_tuning, "graph_timer", lambda fn, calls=8, replays=5: (fn(), ms[launched[-1]])[1])
    monkeypatch.setattr(_tuning, "_cannot_time", lambda: False)
    monkeypatch.setattr(_tuning, "_cache", {})
    return launch, launched


def test_pick_fastest_working_config_and_cache_it(fake):
    launch, launched = fake
    cands = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    assert _tuning.pick(("op", 1), cands, launch, {"name": "default"}) == {"name": "c"}
    n = len(launched)
    assert _tuning.pick(("op", 1), cands, launch, {"name": "default"}) == {"name": "c"}
    assert len(launched) == n  # cached: nothing launched again
    assert _tuning.tuned()[("op", 1)] == {"name": "c"}


def test_pick_times_nothing_inside_capture(fake, monkeypatch):
    launch, launched = fake
    monkeypatch.setattr(_tuning, "_cannot_time", lambda: True)
    assert _tuning.pick(("op", 2), [{"name": "a"}, {"name": "c"}], launch, {"name": "d"}) == {"name": "d"}
    assert launched == []
