"""The packed checkpoint directory on its own (no transformers): write, read back, and every refusal."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import sparserun
from sparserun import checkpoint as ck
from sparserun import formats
from sparserun.checkpoint import CheckpointReader, CheckpointWriter

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64}


def packed_layers(gen):
    """One layer per format, random values, odd-ish shapes."""
    w24 = torch.randn(24, 36, generator=gen)
    idx = torch.rand(24, 9, 4, generator=gen).argsort(-1)[..., :2]
    m24 = torch.zeros(24, 9, 4, dtype=torch.bool).scatter_(-1, idx, True).view(24, 36)
    wb = torch.randn(64, 32, generator=gen, dtype=torch.float16)
    keep = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=torch.bool)
    mb = keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
    wu = torch.randn(10, 13, generator=gen, dtype=torch.bfloat16)
    mu = torch.rand(10, 13, generator=gen) < 0.3
    return {
        "blocks.0.q": (formats.pack(w24, m24, "2:4"), torch.randn(24, generator=gen)),
        "blocks.0.up": (formats.pack(wb, mb, "16x16"), None),
        "blocks.0.down": (formats.pack(wu, mu, "unstructured"), torch.randn(10, generator=gen).bfloat16()),
    }


def write(out, gen, **kw):
    layers = packed_layers(gen)
    plain = {"embed.weight": torch.randn(50, 8, generator=gen), "norm.weight": torch.rand(8, generator=gen) + 1,
             "pos_ids": torch.arange(7), "ln.bias": torch.randn(8, generator=gen, dtype=torch.float16)}
    kw.setdefault("config", CONFIG)
    with CheckpointWriter(out, **kw) as w:
        w.add_tensor("embed.weight", plain["embed.weight"])
        for name, (p, b) in layers.items():
            w.add_layer(name, p, bias=b)
        for k in ("norm.weight", "pos_ids", "ln.bias"):
            w.add_tensor(k, plain[k])
        w.add_alias("head.weight", "embed.weight")
    return layers, plain


@pytest.fixture
def ckpt(tmp_path, gen):
    out = tmp_path / "packed"
    layers, plain = write(out, gen)
    return out, layers, plain


def test_round_trip(ckpt):
    out, layers, plain = ckpt
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sparserun.json"]
    assert json.loads((out / "config.json").read_text()) == CONFIG
    with CheckpointReader(out) as r:
        assert r._handles == {}, "opening must not read tensor data (lazy)"
        m = r.manifest
        assert m["format_version"] == ck.FORMAT_VERSION and m["sparserun_version"]
        assert [rec["name"] for rec in r.layers] == list(layers)
        for rec in r.layers:
            p, b = layers[rec["name"]]
            assert rec["format"] == p.format and rec["shape"] == list(p.shape)
            assert rec["dtype"] == str(p.dtype).removeprefix("torch.")
            assert rec["nbytes"] == p.nbytes() and rec["dense_nbytes"] == p.dense_nbytes()
            assert rec["tensors"] == {role: f"{rec['name']}.{role}" for role in p.tensors}
            assert rec["bias"] == (f"{rec['name']}.bias" if b is not None else None)
            q = r.load_layer(rec, validate=True)
            assert q.format == p.format and q.meta == p.meta
            for role in p.tensors:
                assert torch.equal(q.tensors[role], p.tensors[role])
            assert torch.equal(formats.unpack(q), formats.unpack(p))
            if b is not None:
                assert torch.equal(r.get_tensor(rec["bias"]), b)
        assert r.layer("blocks.0.up")["block"] == 16 and r.layer("blocks.0.up")["nnz"] == 4
        assert r.layer("blocks.0.q")["sparsity"] == 0.5
        for k, t in plain.items():
            assert torch.equal(r.get_tensor(k), t)
        assert r.aliases == {"head.weight": "embed.weight"}
        assert torch.equal(r.get_tensor("head.weight"), plain["embed.weight"])
        assert set(r.dense_tensor_names()) == set(plain) | {"blocks.0.q.bias", "blocks.0.down.bias"}
        sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        assert m["shards"] == {"model.safetensors": {"sha256": sha, "nbytes": (out / "model.safetensors").stat().st_size}}
        t = m["totals"]
        assert t["sparse_layers"] == 3 and t["sparse_nbytes"] == sum(p.nbytes() for p, _ in layers.values())
        assert t["dense_tensors"] == 6


def test_modes_follow_umask(ckpt):
    out, _, _ = ckpt
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


def test_dtype_cast_leaves_index_tensors(ckpt):
    out, layers, _ = ckpt
    with CheckpointReader(out) as r:
        q = r.load_layer("blocks.0.up", dtype=torch.float32)
        assert q.tensors["values"].dtype == torch.float32 and q.tensors["crow_indices"].dtype == torch.int32
        assert r.get_tensor("pos_ids", dtype=torch.float16).dtype == torch.int64
        assert r.load_layer("blocks.0.q", dtype=torch.float16).tensors["meta"].dtype == torch.uint8


def test_sharding(tmp_path, gen):
    out = tmp_path / "sharded"
    layers, plain = write(out, gen, max_shard_bytes=3000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with CheckpointReader(out) as r:
        assert set(r.manifest["shards"]) == set(shards)
        for k, t in plain.items():
            assert torch.equal(r.get_tensor(k), t)
        for name, (p, _) in layers.items():
            assert torch.equal(formats.unpack(r.load_layer(name)), formats.unpack(p))


def test_shared_storage_is_stored(tmp_path, gen):
    base = torch.randn(4, 6, generator=gen)
    with CheckpointWriter(tmp_path / "o", config=CONFIG) as w:
        w.add_tensor("a", base)
        w.add_tensor("b", base)  # same storage: safetensors would refuse; the writer copies
        w.add_tensor("row", base[1])  # a view into a bigger storage
    with CheckpointReader(tmp_path / "o") as r:
        assert torch.equal(r.get_tensor("b"), base) and torch.equal(r.get_tensor("row"), base[1])


def no_leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


def test_refuses_non_empty_output_and_overwrites_atomically(ckpt, gen):
    out, _, _ = ckpt
    with pytest.raises(ck.OutputExists, match=f"{out} exists and is not empty"):
        CheckpointWriter(out, config=CONFIG)
    (out / "stale.txt").write_text("old")
    with CheckpointWriter(out, config={**CONFIG, "hidden_size": 8}, overwrite=True) as w:
        w.add_tensor("x", torch.randn(3, generator=gen))
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 8
    assert no_leftovers(out.parent, out.name)
    # an empty existing directory is fine without overwrite
    (out.parent / "empty").mkdir()
    with CheckpointWriter(out.parent / "empty", config=CONFIG) as w:
        w.add_tensor("x", torch.randn(3, generator=gen))
    assert (out.parent / "empty" / "sparserun.json").is_file()


def test_failure_leaves_nothing(tmp_path, gen):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, config=CONFIG) as w:
            w.add_tensor("x", torch.randn(3, generator=gen))
            raise RuntimeError("boom")
    assert not out.exists() and no_leftovers(tmp_path, "o")
    # a failed overwrite keeps the old checkpoint intact
    write(out, gen)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ck.CheckpointError, match="alias 'y' points to 'nope'"):
        with CheckpointWriter(out, config=CONFIG, overwrite=True) as w:
            w.add_tensor("x", torch.randn(3, generator=gen))
            w.add_alias("y", "nope")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert no_leftovers(tmp_path, "o")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_ctrl_c_during_the_commit_is_held_until_out_is_complete(ckpt, gen, monkeypatch, request, exchange):
    """Ctrl-C between swapping the new OUT in and removing the old one used to leave the old checkpoint behind
    as a hidden sibling (and could interrupt the removal of a temp dir half-way). It is held until the commit
    is done, then raised, with a warning that OUT was complete: OUT is the new checkpoint and nothing is left
    next to it. Both commits: the one-step exchange, and the two renames where the file system has none."""
    import signal

    out, _, _ = ckpt
    # Python's own Ctrl-C handler, whatever an earlier test or library left installed (restored below)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    real_replace, real_exchange = os.replace, ck._exchange
    calls = []

    def replace_then_interrupt(a, b):
        real_replace(a, b)
        calls.append(Path(b))
        if Path(b) == out:  # OUT moved aside, new OUT in place; the old one is not removed yet
            signal.raise_signal(signal.SIGINT)

    def exchange_then_interrupt(a, b):
        assert real_exchange(a, b)
        calls.append(Path(b))
        signal.raise_signal(signal.SIGINT)  # new OUT in place, the old one (now at a) not removed yet
        return True

    monkeypatch.setattr(ck.os, "replace", replace_then_interrupt)
    monkeypatch.setattr(ck, "_exchange", exchange_then_interrupt if exchange else lambda a, b: False)
    with pytest.raises(KeyboardInterrupt), pytest.warns(sparserun.SparserunWarning,
                                                        match="written completely before the interrupt"):
        with CheckpointWriter(out, config={**CONFIG, "hidden_size": 8}, overwrite=True) as w:
            w.add_tensor("x", torch.randn(3, generator=gen))
    assert calls[-1] == out
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 8
    with CheckpointReader(out) as r:
        assert r.get_tensor("x").shape == (3,)
    assert no_leftovers(out.parent, out.name)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_a_replace_killed_between_its_renames_is_not_papered_over(tmp_path, gen):
    """Killed after OUT was moved aside and before the new one moved in (the two-rename commit), the old
    checkpoint was left as a hidden .OUT.old-* and the next run wrote OUT as if nothing had been there."""
    out = tmp_path / "o"
    write(out, gen)
    aside = tmp_path / ".o.old-x1y2z3w4"
    os.replace(out, aside)
    with pytest.raises(ck.OutputExists, match=r"o is missing, but .*\.o\.old-x1y2z3w4 holds the checkpoint"):
        CheckpointWriter(out, config=CONFIG)
    os.replace(aside, out)  # what the message says to do
    write(out, gen, overwrite=True)
    # the same through a link to OUT: the link dangles while the checkpoint is aside
    link = tmp_path / "link"
    link.symlink_to(out)
    os.replace(out, aside)
    with pytest.raises(ck.OutputExists, match=r"link links to .*o, which is missing, but .*\.o\.old-x1y2z3w4 holds"):
        CheckpointWriter(link, config=CONFIG)


def test_concurrent_overwrites_of_one_out(tmp_path):
    """Three processes replacing the same OUT over and over: every commit succeeds, OUT is always one whole
    checkpoint, and no old checkpoint is left behind (interleaved renames failed with "Directory not empty"
    and orphaned .OUT.old-* copies)."""
    import subprocess
    import sys

    out = tmp_path / "o"
    code = ("import sys, torch; from sparserun.checkpoint import CheckpointWriter\n"
            "for i in range(40):\n"
            "    with CheckpointWriter(sys.argv[1], config={'model_type': 'bert', 'i': i}, overwrite=True) as w:\n"
            "        w.add_tensor('x', torch.full((1000,), float(i)))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with CheckpointReader(out) as r:
        assert r.get_tensor("x").shape == (1000,)
    assert no_leftovers(tmp_path, "o")


def test_a_full_disk_names_the_output_and_keeps_the_old_one(ckpt, gen, monkeypatch):
    """safetensors' own ENOSPC message named neither OUT nor the folder it wrote in."""
    import safetensors.torch

    out, _, _ = ckpt
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ck.CheckpointError, match=rf"cannot write the output {out} \(a shard in "
                                                 rf"{out.parent}\): .*No space left on device"):
        write(out, gen, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and no_leftovers(out.parent, out.name)


def test_an_unreadable_file_to_copy_fails_before_the_work(tmp_path, monkeypatch):
    """A tokenizer file the user cannot read failed only at the end, after the whole conversion."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CONFIG))
    (src / "vocab.txt").write_text("a\n")
    real_open = open

    def no_vocab(path, *a, **k):
        if str(path).endswith("vocab.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    import builtins

    monkeypatch.setattr(builtins, "open", no_vocab)  # as for a file of mode 000 (root would read it anyway)
    with pytest.raises(ck.CheckpointError, match=r"vocab\.txt cannot be read \(Permission denied\)"):
        CheckpointWriter(tmp_path / "o", source_dir=src)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_temp_folders_left_by_a_killed_write_are_named(tmp_path, gen):
    """kill -9 during a write leaves its hidden temp folder (GBs for a real model), and nothing ever said so."""
    (tmp_path / ".o.tmp-abc12345").mkdir()
    with pytest.warns(sparserun.SparserunWarning,
                      match=r"1 temp folder\(s\) of earlier writes of o .*\.o\.tmp-abc12345"):
        write(tmp_path / "o", gen)
    assert (tmp_path / "o" / "sparserun.json").is_file()


def test_another_outputs_temp_folder_is_not_ours(tmp_path, gen):
    """`.bar.old-*` matched `.bar.old-2024.tmp-abcd1234`, the temp folder of an output named bar.old-2024:
    writing `bar` was refused as if an interrupted replace had left it."""
    (tmp_path / ".bar.old-2024.tmp-abcd1234").mkdir()
    (tmp_path / ".bar.tmp-x.tmp-abcd1234").mkdir()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", sparserun.SparserunWarning)  # and no stale-temp warning either
        write(tmp_path / "bar", gen)


def test_ctrl_c_while_waiting_for_another_commit(tmp_path):
    """The commit waits for the lock on OUT's parent; that wait was inside the block that holds Ctrl-C, so the
    process could not be interrupted while another writer (or any flock holder) kept it waiting."""
    import fcntl
    import signal
    import subprocess
    import sys
    import time

    code = ("import signal, torch; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from sparserun.checkpoint import CheckpointWriter\n"
            "w = CheckpointWriter(r'%s', config={'model_type': 'bert'})\n"
            "w.add_tensor('x', torch.ones(3)); print('ready', flush=True); w.finish()\n" % (tmp_path / "o"))
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # now waiting for the lock
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("Ctrl-C did not stop a writer waiting for the commit lock")
    finally:
        os.close(fd)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not (tmp_path / "o").exists() and no_leftovers(tmp_path, "o")


def test_an_old_checkpoint_that_cannot_be_deleted_is_named(ckpt, gen, monkeypatch):
    """A read-only folder inside the replaced checkpoint: it stayed as a hidden sibling, silently, and the next
    run called it a killed write."""
    out, _, _ = ckpt
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)  # as if nothing could be deleted
    with pytest.warns(sparserun.SparserunWarning, match=rf"{out} was replaced, but the previous checkpoint could "
                                                        r"not be fully deleted: what is left of it is in "):
        write(out, gen, overwrite=True)


def test_a_mount_point_is_refused_before_the_work(tmp_path, monkeypatch):
    """OUT a mount point: the rename at the end failed with a raw EBUSY, after all the work."""
    out = tmp_path / "mnt"
    out.mkdir()
    monkeypatch.setattr(ck.os.path, "ismount", lambda p: Path(p) == out)
    with pytest.raises(ck.OutputExists, match="is a mount point, which a write cannot replace"):
        CheckpointWriter(out, config=CONFIG, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]


def test_every_signal_handler_is_restored_even_if_a_signal_lands_between(monkeypatch):
    """A Ctrl-C while the handlers were being put back left SIGTERM's hold function installed for good: every
    later SIGTERM in that process was swallowed."""
    import signal

    set_to = {}
    real = signal.signal

    def flaky(sig, handler):
        set_to[sig] = handler
        if sig == signal.SIGINT:
            raise KeyboardInterrupt  # the Ctrl-C that arrives right after SIGINT's handler is back
        return real(sig, signal.getsignal(sig))

    monkeypatch.setattr(ck.signal, "signal", flaky)
    with pytest.raises(KeyboardInterrupt):
        ck._restore_handlers([(signal.SIGINT, "int"), (signal.SIGTERM, "term"), (signal.SIGHUP, "hup")])
    assert set_to == {signal.SIGINT: "int", signal.SIGTERM: "term", signal.SIGHUP: "hup"}


def test_an_interrupt_right_after_the_commit_still_says_out_is_complete(ckpt, gen, monkeypatch):
    out, _, _ = ckpt
    real = ck._restore_handlers

    def then_ctrl_c(items):
        real(items)
        raise KeyboardInterrupt  # lands as the commit block ends, after it held nothing

    monkeypatch.setattr(ck, "_restore_handlers", then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), pytest.warns(sparserun.SparserunWarning,
                                                        match="written completely before the interrupt"):
        with CheckpointWriter(out, config={**CONFIG, "hidden_size": 8}, overwrite=True) as w:
            w.add_tensor("x", torch.randn(3, generator=gen))
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 8 and no_leftovers(out.parent, out.name)


def test_a_long_name_in_a_non_latin_script(tmp_path, gen):
    """The temp name was cut to 200 characters, not bytes: 121 x "é" (242 bytes, a legal name) overflowed; cut
    by bytes, it must still end on a whole character (81 x "模", 3 bytes each, has none at byte 200)."""
    for name in ("é" * 121, "模" * 81):
        write(tmp_path / name, gen)
        assert (tmp_path / name / "sparserun.json").is_file() and no_leftovers(tmp_path, name)
        assert ck._hidden_name(tmp_path / name, "tmp").encode("utf-8")  # valid UTF-8, no lone surrogates


def test_writer_refusals(tmp_path, gen):
    with CheckpointWriter(tmp_path / "o", config=CONFIG) as w:
        w.add_tensor("x", torch.randn(3, generator=gen))
        with pytest.raises(ck.CheckpointError, match="'x' added twice"):
            w.add_tensor("x", torch.randn(3, generator=gen))
        with pytest.raises(ck.CheckpointError, match="y: tensor is on the meta device"):
            w.add_tensor("y", torch.empty(3, device="meta"))
        with pytest.raises(TypeError, match="z: expected a torch.Tensor"):
            w.add_tensor("z", [1, 2])
    with pytest.raises(ck.CheckpointError, match="no config.json"):
        with CheckpointWriter(tmp_path / "o2") as w:
            w.add_tensor("x", torch.randn(3, generator=gen))
    assert not (tmp_path / "o2").exists()


def test_copies_source_files_unchanged_and_never_writes_source(tmp_path, gen):
    src = tmp_path / "src"
    src.mkdir()
    files = {"config.json": json.dumps(CONFIG), "generation_config.json": '{"do_sample": false}',
             "tokenizer.json": '{"v": 1}', "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
             "vocab.txt": "a\nb\n", "merges.txt": "#\n", "tokenizer.model": "\x00\x01spm",
             "added_tokens.json": "{}", "chat_template.jinja": "{{ x }}"}
    for k, v in files.items():
        (src / k).write_text(v)
    (src / "model.safetensors").write_bytes(b"weights, never copied")
    (src / "README.md").write_text("not copied")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    out = tmp_path / "out"
    with CheckpointWriter(out, source_dir=src, config={"model_type": "other"}) as w:
        w.add_tensor("x", torch.randn(3, generator=gen))
    for k, v in files.items():
        assert (out / k).read_text() == v, k  # source's config wins over config=
    assert not (out / "README.md").exists()
    assert (out / "model.safetensors").read_bytes() != b"weights, never copied"
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()} == before
    with CheckpointReader(out) as r:
        assert r.manifest["source"] == str(src.absolute())
    for bad_out in (src, src / "packed"):
        with pytest.raises(ck.CheckpointError, match="overlaps the source directory"):
            CheckpointWriter(bad_out, source_dir=src, overwrite=True)
    with pytest.raises(ck.CheckpointError, match="overlaps the source directory"):
        CheckpointWriter(tmp_path, source_dir=src, overwrite=True)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()} == before


# ---- strict reading: every bad input is one clear error naming the problem -----------------------

def edit_manifest(out, fn):
    m = json.loads((out / "sparserun.json").read_text())
    fn(m)
    (out / "sparserun.json").write_text(json.dumps(m))


def test_missing_directory(tmp_path):
    with pytest.raises(ck.CheckpointNotFound, match="checkpoint directory not found: .*nope"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ck.CheckpointNotFound, match="not a directory"):
        CheckpointReader(tmp_path / "f")


def test_missing_tokenizer_directory_fails_before_writing(tmp_path):
    with pytest.raises(ck.CheckpointNotFound, match="tokenizer directory not found: .*nope"):
        ck.CheckpointWriter(tmp_path / "out", config={"model_type": "x"}, tokenizer_dir=tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind


def test_directory_without_config(ckpt):
    out, _, _ = ckpt
    (out / "config.json").unlink()
    with pytest.raises(ck.MissingConfig, match="has no config.json"):
        CheckpointReader(out)


def test_directory_without_manifest(ckpt):
    out, _, _ = ckpt
    (out / "sparserun.json").unlink()
    with pytest.raises(ck.ManifestError, match="no sparserun.json: not a sparserun packed checkpoint"):
        CheckpointReader(out)
    (out / "sparserun.json").write_text("{not json")
    with pytest.raises(ck.ManifestError, match="sparserun.json is not valid JSON"):
        CheckpointReader(out)


def test_truncated_shard_names_file(ckpt):
    out, _, _ = ckpt
    shard = out / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    for verify in (True, False):
        with pytest.raises(ck.CorruptShard, match=r"shard model\.safetensors has \d+ bytes but sparserun.json says"):
            CheckpointReader(out, verify=verify)
    shard.unlink()
    with pytest.raises(ck.CorruptShard, match="shard model.safetensors listed in sparserun.json is missing"):
        CheckpointReader(out)


def test_truncated_shard_with_matching_manifest_names_file(ckpt):
    # even if the manifest were rewritten to the truncated size, the header check catches it
    out, _, _ = ckpt
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    edit_manifest(out, lambda m: m["shards"]["model.safetensors"].update(nbytes=shard.stat().st_size))
    with pytest.raises(ck.CorruptShard, match="shard model.safetensors: tensor .* lies past the end"):
        CheckpointReader(out, verify=False)


def test_corrupted_shard_checksum(ckpt):
    out, _, _ = ckpt
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data: same size, valid header
    shard.write_bytes(bytes(data))
    with pytest.raises(ck.ChecksumMismatch, match="shard model.safetensors: sha256 mismatch"):
        CheckpointReader(out)
    CheckpointReader(out, verify=False).close()  # verification can be skipped


def test_checksum_mismatch_in_manifest(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m["shards"]["model.safetensors"].update(sha256="0" * 64))
    with pytest.raises(ck.ChecksumMismatch, match="expected 0000"):
        CheckpointReader(out)


def test_corrupted_header_names_file(ckpt):
    out, _, _ = ckpt
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    with pytest.raises(ck.CorruptShard, match="shard model.safetensors is not a readable safetensors file"):
        CheckpointReader(out, verify=False)


def test_newer_format_version(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m.update(format_version=ck.FORMAT_VERSION + 1))
    with pytest.raises(ck.UnsupportedVersion, match=f"format_version {ck.FORMAT_VERSION + 1} is newer than "
                                                    f"this sparserun supports \\({ck.FORMAT_VERSION}\\)"):
        CheckpointReader(out)
    edit_manifest(out, lambda m: m.pop("format_version"))
    with pytest.raises(ck.ManifestError, match="missing or invalid format_version"):
        CheckpointReader(out)


def test_unknown_format_in_record(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m["layers"][1].update(format="csr"))
    with pytest.raises(ck.UnknownFormat, match="layer blocks.0.up: unknown format 'csr'"):
        CheckpointReader(out)


def test_unknown_pattern_in_record(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m["layers"][0].update(pattern="3:3"))
    with pytest.raises(ck.ManifestError, match="layer blocks.0.q: unknown sparsity pattern '3:3'"):
        CheckpointReader(out)


def test_record_shape_mismatch(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m["layers"][0].update(shape=[24, 40]))
    with pytest.raises(ck.TensorMismatch, match=r"layer blocks.0.q: tensor blocks.0.q.values is float32 \[24, 18\], "
                                                r"the record implies float32 \[24, 20\]"):
        CheckpointReader(out)
    edit_manifest(out, lambda m: m["layers"][0].update(shape=[24, 36], dtype="float16"))
    with pytest.raises(ck.TensorMismatch, match="the record implies float16"):
        CheckpointReader(out)


def test_tensor_map_mismatch(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m["tensors"]["norm.weight"].update(shape=[9]))
    with pytest.raises(ck.TensorMismatch, match=r"tensor norm.weight in shard model.safetensors is float32 \[8\]"):
        CheckpointReader(out)
    edit_manifest(out, lambda m: (m["tensors"]["norm.weight"].update(shape=[8]),
                                  m["tensors"].update(ghost={**m["tensors"]["norm.weight"]})))
    with pytest.raises(ck.TensorMismatch, match="tensor ghost is missing from shard model.safetensors"):
        CheckpointReader(out)


def test_bad_shard_name_in_manifest(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m["shards"].update({"../evil.safetensors": {"sha256": "", "nbytes": 1}}))
    with pytest.raises(ck.ManifestError, match="invalid shard file name '../evil.safetensors'"):
        CheckpointReader(out)


def _rewrite_header(shard, edit):
    """Rewrite a safetensors header in place (same length, padded with spaces as safetensors pads it)."""
    import struct

    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    data[8:8 + n] = raw + b" " * (n - len(raw))
    shard.write_bytes(bytes(data))


def test_lying_safetensors_headers_are_refused(ckpt, monkeypatch):
    """A header is checked against the file before any tensor is read: extents that do not match shape x
    dtype, two tensors sharing bytes, a header too large to parse (safetensors' own limit)."""
    out, _, _ = ckpt
    shard = out / "model.safetensors"
    good = shard.read_bytes()

    def grow(h):
        b, e = h["norm.weight"]["data_offsets"]
        h["norm.weight"]["data_offsets"] = [b, e + 4]

    _rewrite_header(shard, grow)
    with pytest.raises(ck.CorruptShard, match=r"tensor 'norm.weight' spans 36 bytes, its shape \[8\] and dtype "
                                              r"F32 need 32"):
        CheckpointReader(out, verify=False)
    shard.write_bytes(good)

    def overlap(h):
        h["norm.weight"]["data_offsets"] = list(h["embed.weight"]["data_offsets"])
        h["norm.weight"]["data_offsets"][1] = h["norm.weight"]["data_offsets"][0] + 32

    _rewrite_header(shard, overlap)
    with pytest.raises(ck.CorruptShard, match="overlap"):
        CheckpointReader(out, verify=False)
    shard.write_bytes(good)
    monkeypatch.setattr(ck, "_MAX_HEADER", 64)
    with pytest.raises(ck.CorruptShard, match="exceeds the 64 bytes safetensors allows"):
        CheckpointReader(out, verify=False)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"][1].update(nnz=True), "needs a non-negative 'nnz'"),
    (lambda m: m["layers"][0]["tensors"].update(values=["x"]), "tensor names must be strings"),
    (lambda m: m["shards"].update({"model.safetensors": 7}), "shard 'model.safetensors': expected an object"),
    (lambda m: m["aliases"].update({"norm.weight": "embed.weight"}), "alias 'norm.weight' is also a stored tensor"),
    (lambda m: m["aliases"].update({"head.weight": "blocks.0.q.values"}), "points into the packed layer tensor"),
    (lambda m: m["aliases"].update({"head.weight": ["embed.weight"]}), "points to unknown tensor"),
])
def test_manifest_values_of_the_wrong_kind_are_one_line_errors(ckpt, edit, match):
    out, _, _ = ckpt
    edit_manifest(out, edit)
    with pytest.raises(ck.ManifestError, match=match):
        CheckpointReader(out, verify=False)


def test_a_manifest_nested_too_deeply_is_a_manifest_error(ckpt):
    out, _, _ = ckpt
    (out / "sparserun.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ck.ManifestError, match="sparserun.json is not valid JSON: nested too deeply"):
        CheckpointReader(out, verify=False)


def test_errors_are_one_line(ckpt):
    out, _, _ = ckpt
    edit_manifest(out, lambda m: m["layers"][2].update(dtype="float64"))
    with pytest.raises(ck.CheckpointError) as e:
        CheckpointReader(out)
    assert "\n" not in str(e.value) and "blocks.0.down" in str(e.value)


def test_temp_dir_is_next_to_output(tmp_path, gen, monkeypatch):
    seen = []
    real = ck.CheckpointWriter._flush

    def spy(self):
        seen.append(self.tmp)
        return real(self)

    monkeypatch.setattr(ck.CheckpointWriter, "_flush", spy)
    out = tmp_path / "deep" / "out"
    with CheckpointWriter(out, config=CONFIG) as w:
        w.add_tensor("x", torch.randn(3, generator=gen))
    assert seen and seen[0].parent == out.parent and seen[0].name.startswith(".out.tmp-")
    assert not seen[0].exists() and os.path.isdir(out)


def test_an_empty_output_path_or_a_non_bool_overwrite_is_refused(tmp_path, monkeypatch, gen):
    """"" is the current directory to pathlib: with overwrite it would have been replaced; and overwrite="no"
    is true. Both are refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious").write_text("x")
    for out in ("", "  "):
        with pytest.raises(ValueError, match="the output directory is an empty path"):
            ck.check_output_dir(out, True)
        with pytest.raises(ValueError, match="empty path"):
            CheckpointWriter(out, config=CONFIG, overwrite=True)
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
        write(tmp_path / "out", gen, overwrite="no")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
