"""The kernel benchmark harness runs end to end without a GPU (tiny shapes, Triton interpreter)."""
import argparse
import json

from sparserun.bench.kernels import run_cli


def test_dry_run_writes_all_backends(tmp_path):
    args = argparse.Namespace(dry_run=True, out=str(tmp_path), kind="kernels")
    assert run_cli(args) == 0
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
