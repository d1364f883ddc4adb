"""kernels/_tuning.pick: fastest working and *correct* config per key, cached; configs that fail or compute
wrong are skipped; nothing is timed while capturing or compiling (the default is used). Timer faked: CPU."""
import pytest

from sparserun.kernels import _tuning
from sparserun.runtime import tuning as rt_tuning


@pytest.fixture
def fake(monkeypatch):
    ms = {"a": 3.0, "b": 1.0, "c": 2.0, "w": 0.5}
    launched = []

    def launch(cfg):
        launched.append(cfg["name"])
        if cfg["name"] == "b":
            raise RuntimeError("out of shared memory")  # the fastest-looking config does not fit
        return cfg["name"]  # the "output"

    monkeypatch.setattr(rt_tuning, "graph_timer", lambda fn, calls=8, replays=5: (fn(), ms[launched[-1]])[1])
    monkeypatch.setattr(_tuning, "_cannot_time", lambda: False)
    monkeypatch.setattr(_tuning, "_cache", {})
    monkeypatch.setattr(_tuning, "_rejected", {})
    return launch, launched


def _once(items):
    """A candidates/default factory that records being called."""
    calls = []

    def make():
        calls.append(1)
        return items
    make.calls = calls
    return make


def test_pick_fastest_working_config_and_cache_it(fake):
    launch, launched = fake
    cands = _once([{"name": "a"}, {"name": "b"}, {"name": "c"}])
    assert _tuning.pick(("op", 1), cands, launch, lambda: {"name": "default"}) == {"name": "c"}
    n = len(launched)
    assert _tuning.pick(("op", 1), cands, launch, lambda: {"name": "default"}) == {"name": "c"}
    assert len(launched) == n  # cached: nothing launched again
    assert len(cands.calls) == 1  # and the candidate list is not even built on a hit (host time per call)
    assert _tuning.tuned()[("op", 1)] == {"name": "c"}
    assert "out of shared memory" in _tuning.rejected()[("op", 1)][0][1]


def test_a_fast_config_with_wrong_output_is_never_chosen(fake):
    launch, _ = fake
    err = {"a": 0.0, "c": 1e-3, "w": 0.9}  # "w" is the fastest (0.5) but wrong
    cands = lambda: [{"name": "a"}, {"name": "w"}, {"name": "c"}]  # noqa: E731
    assert _tuning.pick(("op", 3), cands, launch, lambda: {"name": "a"}, check=lambda out: err[out]) == {"name": "c"}
    assert _tuning.rejected()[("op", 3)] == [({"name": "w"}, "relative error 0.9")]
    nan = lambda out: float("nan")  # noqa: E731
    with pytest.raises(RuntimeError, match="no kernel config for .*'op', 4.* ran correctly"):
        _tuning.pick(("op", 4), cands, launch, lambda: {"name": "a"}, check=nan)
    assert ("op", 4) not in _tuning.tuned()


def test_pick_times_nothing_inside_capture(fake, monkeypatch):
    launch, launched = fake
    monkeypatch.setattr(_tuning, "_cannot_time", lambda: True)
    assert _tuning.pick(("op", 2), lambda: [{"name": "a"}, {"name": "c"}], launch,
                        lambda: {"name": "d"}) == {"name": "d"}
    assert launched == []


@pytest.mark.parametrize("kind", ["semi24", "bsr"])
def test_launchers_check_their_tuning_candidates(kind, monkeypatch):
    """The check each launcher hands to pick: ~0 for its own output, large for a corrupted one (the tail of
    the sampled rows included), on sizes with more rows than the sample."""
    import torch

    from sparserun.kernels import bsr_matmul as bmod
    from sparserun.kernels import semi24_matmul as smod

    from ._data import random_24, random_bsr

    mod = smod if kind == "semi24" else bmod
    seen = {}

    def fake_pick(key, candidates, launch, default, check=None, tol=2e-2):
        seen.update(launch=launch, check=check, cands=candidates())
        return seen["cands"][0]

    monkeypatch.setattr(mod, "pick", fake_pick)
    monkeypatch.setattr(mod, "interpreting", lambda: False)  # take the tuning path on CPU tensors
    gen = torch.Generator().manual_seed(0)
    m, n, k = 3, 160, 64
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    if kind == "semi24":
        p = random_24(n, k, torch.float32, "cpu", gen).tensors
        mod.semi24_matmul(x, p["values"], p["meta"], k, b)
    else:
        p = random_bsr(n, k, 16, 0.5, torch.float32, "cpu", gen).tensors
        most = int((p["crow_indices"][1:] - p["crow_indices"][:-1]).max())
        mod.bsr_matmul(x, p["crow_indices"], p["col_indices"], p["values"], most, b)
    monkeypatch.undo()  # run the kernel itself through the interpreter again
    monkeypatch.setattr(mod, "interpreting", lambda: True)
    cfg = (smod.interpreter_config(m, n, k, torch.float32) if kind == "semi24" else bmod.interpreter_config(m, 16))
    y = seen["launch"](cfg)
    assert seen["check"](y) < 1e-5
    bad = y.clone()
    bad[:, -1] += 10  # the last output feature: a tile tail
    assert seen["check"](bad) > 1e-2
