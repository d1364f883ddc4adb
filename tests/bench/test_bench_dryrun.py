"""The kernel benchmark harness runs end to end without a GPU (tiny shapes, Triton interpreter)."""
import json

import pytest

from sparserun.bench.kernels import main


def test_dry_run_writes_all_backends(tmp_path):
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*-kernels-dryrun.json")
    res = json.loads(js.read_text())
    assert res["env"]["dry_run"]
    assert res["failures"] == {}
    backends = {r["backend"] for r in res["rows"]}
    assert backends == {"dense_cublas", "sparserun_2:4", "sparserun_32x32_d0.5", "sparserun_2:4_auto",
                        "sparserun_32x32_d0.5_auto"}  # _auto: the layer through the dispatcher
    assert {r["M"] for r in res["rows"]} == {1, 3, 33}
    assert all(r["ms"] > 0 for r in res["rows"])
    assert "DRY RUN" in js.with_suffix(".md").read_text()


@pytest.mark.parametrize("args,msg", [
    (["--dtypes", "int8"], "--dtypes takes bf16 and/or fp16, got int8"),
    (["--shapes", "foo"], "--shapes takes comma-separated indices 0.."),
    (["--shapes", "99"], "--shapes takes comma-separated indices 0.."),
    (["--m", "0"], "--m takes comma-separated token counts >= 1, got '0'"),
    (["--kind", "../x"], "--kind '../x' must be letters, digits"),
])
def test_bad_options_are_errors_even_in_a_dry_run(tmp_path, args, msg):
    with pytest.raises(ValueError, match=msg):
        main(["--dry-run", "--out", str(tmp_path), *args])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--m", "1,2"], ["--quick"], ["--dtypes", "bf16"], ["--blocks", "none"],
                                  ["--shapes", "0"]])
def test_a_dry_run_refuses_options_it_would_ignore(tmp_path, args):
    with pytest.raises(ValueError, match=f"--dry-run times fixed tiny shapes .* leave out {args[0]}"):
        main(["--dry-run", "--out", str(tmp_path), *args])
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_where_no_kernel_ran_fails(tmp_path, monkeypatch, capsys):
    """The harness can run with every sparserun kernel failing (TRITON_INTERPRET=0 exported on a CPU): the
    results are still written, but the run must not report success."""
    from sparserun.bench import kernels

    def only_dense(**kw):
        return {"env": kernels.environment() | {"dry_run": "test", "copy_gbs": 1.0}, "rows": [
            dict(dtype="fp16", shape="tiny", N=64, K=128, M=1, backend="dense_cublas", density=1.0, ms=0.1)],
            "failures": {"sparserun_2:4/fp16/tiny/M1": "RuntimeError: 0 active drivers"}}

    monkeypatch.setattr(kernels, "run", only_dense)
    assert main(["--dry-run", "--out", str(tmp_path)]) == 1
    assert "every sparserun kernel failed in the dry run" in capsys.readouterr().err
    assert list(tmp_path.glob("*-kernels-dryrun.json"))  # what it measured is kept


def test_a_failed_plot_keeps_the_results_and_says_so(tmp_path, monkeypatch, capsys):
    from sparserun.bench import timing

    stem = tmp_path / "gpu-2026-01-01-kernels"
    (tmp_path / "gpu-2026-01-01-kernels.png").write_bytes(b"old plot")

    def broken_plot(result, path):
        path.write_bytes(b"half a png")
        raise ValueError("no rows to plot")

    timing.finish_results(stem, ["# t"], {"failures": {}}, broken_plot)
    out = capsys.readouterr().out
    assert "wrote" in out and ".json/.md;" in out and "the plot failed (ValueError: no rows to plot)" in out
    assert (tmp_path / "gpu-2026-01-01-kernels.md").read_text() == "# t\n"
    assert (tmp_path / "gpu-2026-01-01-kernels.png").read_bytes() == b"old plot"  # not half-overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-2026-01-01-kernels.md", "gpu-2026-01-01-kernels.png"]


def test_an_unwritable_out_is_refused_before_the_run(tmp_path, monkeypatch):
    from sparserun.bench import kernels

    monkeypatch.setattr(kernels, "run", lambda **kw: pytest.fail("ran before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=f"cannot write results to --out {blocker / 'sub'}"):
        main(["--dry-run", "--out", str(blocker / "sub")])


def test_two_writers_of_one_results_file(tmp_path):
    """Two runs writing the same day's file shared one temp name: one's rename found the other's temp gone
    (FileNotFoundError) and readers saw torn JSON. Each write now has its own temp file."""
    import json
    import threading

    from sparserun.bench import timing

    path = tmp_path / "r.json"
    errors = []

    def writer(tag):
        try:
            for i in range(100):
                timing.write_json(path, {"writer": tag, "i": i, "rows": list(range(200))})
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(path.read_text())["i"] == 99
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp left behind
