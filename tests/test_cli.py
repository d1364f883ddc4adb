"""`sparserun` command: inspect (table and JSON) and the one-line error contract."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sparserun import cli


def run(capsys, *argv):
    rc = cli.main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("pattern, fmt, limit", [("2:4", "semi24", 0.57), ("32x32", "bsr", 0.52)])
def test_inspect_table_and_json(minilm_packed, capsys, pattern, fmt, limit):
    d = minilm_packed[pattern]["dir"]
    rc, out, err = run(capsys, "inspect", d)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("layer "))
    assert lines[header].split() == ["layer", "format", "pattern", "shape", "dtype", "sparsity", "packed",
                                     "dense", "ratio"]
    rows = [l.split() for l in lines[header + 1: header + 38]]
    assert len(rows) == 37 and {r[1] for r in rows} == {fmt} and {r[2] for r in rows} == {pattern}
    assert rows[0][0] == "encoder.layer.0.attention.self.query" and rows[0][3] == "384x384"
    assert rows[-1][0] == "pooler.dense" and all(r[5] == "50.0%" for r in rows)
    assert "sparse linear layers: 37" in out and "dense tensors:" in out and "whole checkpoint:" in out

    rc, out, err = run(capsys, "inspect", d, "--json")
    assert rc == 0
    info = json.loads(out)
    assert len(info["layers"]) == 37 and info["architecture"] == "BertModel"
    s = info["totals"]["sparse_layers"]
    assert s["count"] == 37 and s["ratio"] <= limit and s["nbytes"] == sum(x["nbytes"] for x in info["layers"])
    assert info["totals"]["dense_tensors"]["count"] == len(info["dense_tensors"]) > 0
    c = info["totals"]["checkpoint"]
    assert c["nbytes"] == sum(p.stat().st_size for p in d.glob("*.safetensors"))
    # the ratio's two sides are both in the JSON (nbytes holds the shard headers too)
    assert c["ratio"] == round(c["tensor_nbytes"] / c["dense_nbytes"], 4) and c["tensor_nbytes"] < c["nbytes"]
    assert c["tensor_nbytes"] == s["nbytes"] + info["totals"]["dense_tensors"]["nbytes"]
    assert info["verified"] is False

    rc, out, _ = run(capsys, "inspect", d, "--dense", "--verify")
    assert rc == 0 and "embeddings.word_embeddings.weight" in out
    assert "verified: the sha256 of every shard (1) matches the manifest" in out


def assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_inspect_errors(tmp_path, capsys, minilm_packed):
    rc, out, err = run(capsys, "inspect", tmp_path / "nope")
    assert_one_line_error(rc, err, "not found", "nope")
    (tmp_path / "noconfig").mkdir()
    rc, out, err = run(capsys, "inspect", tmp_path / "noconfig")
    assert_one_line_error(rc, err, "config.json")

    import shutil

    d = tmp_path / "c"
    shutil.copytree(minilm_packed["2:4"]["dir"], d)
    shard = d / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    rc, out, err = run(capsys, "inspect", d, "--verify")
    assert_one_line_error(rc, err, "model.safetensors", "sha256")
    shard.write_bytes(bytes(data[:-10]))
    rc, out, err = run(capsys, "inspect", d)
    assert_one_line_error(rc, err, "model.safetensors", "bytes")
    m = json.loads((d / "sparserun.json").read_text())
    m["format_version"] = 99
    (d / "sparserun.json").write_text(json.dumps(m))
    rc, out, err = run(capsys, "inspect", d)
    assert_one_line_error(rc, err, "format_version 99 is newer")


def test_inspect_prints_sizes_from_the_tensors_not_the_manifests_claims(tmp_path, capsys, minilm_packed):
    """A checkpoint from elsewhere can claim anything in its records: inspect derives the bytes from the
    shapes and dtypes checked against the shard headers, and shows a sparsity that cannot be one as '?'."""
    import shutil

    d = tmp_path / "c"
    shutil.copytree(minilm_packed["2:4"]["dir"], d)
    rc, honest, _ = run(capsys, "inspect", d, "--json")
    m = json.loads((d / "sparserun.json").read_text())
    m["layers"][0].update(nbytes=1, dense_nbytes=0, sparsity=7)
    (d / "sparserun.json").write_text(json.dumps(m))
    rc, out, err = run(capsys, "inspect", d, "--json")
    assert rc == 0
    got, want = json.loads(out), json.loads(honest)
    assert got["totals"] == want["totals"]
    assert got["layers"][0]["nbytes"] == want["layers"][0]["nbytes"] > 1 and got["layers"][0]["sparsity"] is None
    rc, out, err = run(capsys, "inspect", d)
    rows = out.splitlines()
    first = rows[next(i for i, line in enumerate(rows) if line.startswith("layer ")) + 1].split()
    assert rc == 0 and first[0] == "encoder.layer.0.attention.self.query" and first[5] == "?"


def test_debug_shows_the_exception(tmp_path):
    from sparserun.checkpoint import CheckpointNotFound

    with pytest.raises(CheckpointNotFound):
        cli.main(["inspect", str(tmp_path / "nope"), "--debug"])
    with pytest.raises(CheckpointNotFound):
        cli.main(["--debug", "inspect", str(tmp_path / "nope")])


def test_usage(capsys):
    rc, out, err = run(capsys, "--help")
    assert rc == 0 and "inspect" in out
    rc, out, err = run(capsys)
    assert rc == 2 and "usage:" in err
    rc, out, err = run(capsys, "frobnicate")
    assert rc == 2 and "invalid choice" in err
    rc, out, err = run(capsys, "--version")
    assert rc == 0 and "sparserun" in out


def _add_hello(sub):
    p = sub.add_parser("hello", help="test subcommand")
    p.add_argument("--fail", action="store_true")

    def _run(args):
        if args.fail:
            raise KeyError("weird")
        print("hi")
        return 0

    p.set_defaults(func=_run)


def test_registry_accepts_lazy_entries(monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + ["tests.test_cli:_add_hello"])
    rc, out, err = run(capsys, "hello")
    assert rc == 0 and out == "hi\n"
    rc, out, err = run(capsys, "hello", "--fail")  # an unexpected exception type names itself, one line
    assert_one_line_error(rc, err, "KeyError", "--debug")


def test_module_entry_point(minilm_packed):
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "inspect", str(minilm_packed["2:4"]["dir"]),
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["layers"]) == 37


def test_sigterm_handler_is_restored():
    before = {s: signal.getsignal(s) for s in cli._TERMINATING}
    assert cli.main(["--version"]) == 0
    assert {s: signal.getsignal(s) for s in cli._TERMINATING} == before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig, said", [(signal.SIGTERM, "error: terminated"),
                                       (getattr(signal, "SIGHUP", None), "error: terminated (hangup)")],
                         ids=["SIGTERM", "SIGHUP"])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, sig, said):
    """`timeout` / a job scheduler sends SIGTERM, a closed terminal or ssh session SIGHUP: the writer's temp
    directory goes, as on Ctrl-C (was: left behind, the process killed without a word)."""
    from .prune._models import save_llama_dir

    src = save_llama_dir(tmp_path / "src")
    out = tmp_path / "out"
    # many calibration windows: pruning runs for seconds after the writer has made its temp directory
    proc = subprocess.Popen([sys.executable, "-m", "sparserun.cli", "convert", str(src), str(out), "--method",
                             "sparsegpt", "--pattern", "2:4", "--nsamples", "1024", "--seqlen", "64", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.tmp-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "convert made no temp directory in 60 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip() == said and stdout == ""
    assert not list(tmp_path.glob(".out.tmp-*")) and not out.exists()


def test_closed_stdout_pipe_is_quiet(minilm_packed):
    """`sparserun inspect DIR --json | head -1`: was `error: [Errno 32] Broken pipe`. The reading end is closed
    before the command starts, so its first write fails, however small the output."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "sparserun.cli", "inspect", str(minilm_packed["2:4"]["dir"]),
                               "--json"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 1 and proc.stderr == ""


def test_sparseruns_warnings_print_as_one_line(capsys):
    """A SparserunWarning is one `warning: ...` line even when it points at the model code that caused it
    (T5's read of wo.weight); another library's warning keeps Python's format."""
    import functools
    import warnings

    import sparserun

    others = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = functools.partial(cli._show_warning, default=lambda *a: others.append(a[:4]))
        warnings.warn_explicit("SparseLinear.weight was read", sparserun.SparserunWarning,
                               "/site-packages/transformers/models/t5/modeling_t5.py", 88)
        warnings.warn_explicit("sparserun: from inside", UserWarning, cli.__file__, 1)
        warnings.warn_explicit("something else", UserWarning, "/elsewhere/lib.py", 7)
    assert capsys.readouterr().err == "warning: SparseLinear.weight was read\nwarning: from inside\n"
    assert [(str(m), c, f, n) for m, c, f, n in others] == [("something else", UserWarning, "/elsewhere/lib.py", 7)]


def test_an_ascii_terminal_prints_any_path(minilm_packed, tmp_path, monkeypatch):
    """In a C/POSIX locale (stdout ASCII) a path or text with other characters ended runs with exit 1 after the
    work was done ('ascii' codec can't encode). They are printed as backslash escapes instead; a closed stdout
    (`>&-`) is not an error either."""
    import io
    import shutil

    d = tmp_path / "sortie_é"
    shutil.copytree(minilm_packed["2:4"]["dir"], d)
    raw = io.BytesIO()
    ascii_out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    assert cli.main(["inspect", str(d)]) == 0
    ascii_out.flush()
    assert "sortie_\\xe9" in raw.getvalue().decode("ascii")
    assert ascii_out.errors == "strict"  # put back for the caller
    monkeypatch.setattr(sys, "stdout", None)
    assert cli.main(["inspect", str(d)]) == 0


@pytest.mark.parametrize("command", ["generate", "finetune"])
@pytest.mark.parametrize("seed, said", [("2**70", "not an integer"), (str(2 ** 64), "outside the seeds torch takes")])
def test_seed_is_checked_before_loading(command, seed, said, capsys):
    """A seed torch cannot take failed with "Overflow when unpacking long long" only after the model loaded."""
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([command, "DIR-never-read", "--seed", seed])
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert cli.seed_arg(str(2 ** 64 - 1)) == 2 ** 64 - 1 and cli.seed_arg("-5") == -5
