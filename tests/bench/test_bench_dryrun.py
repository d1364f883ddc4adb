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
