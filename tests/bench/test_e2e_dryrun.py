"""The end-to-end benchmark harness runs on a CPU with a tiny config (every variant kind, every mode through
its stand-in, results files written, merged and tabulated), and its byte accounting matches a real packed
checkpoint. A GPU-marked test runs the real GPU path (CUDA graphs, memory) on a small model."""
import argparse
import json
import os

import pytest
import torch

from sparserun.bench import e2e


def _args(tmp_path, **kw):
    base = dict(dry_run=True, out=str(tmp_path), variants="all", batches=None, prompts=None, modes=None,
                decode_tokens=None, warmup=3, prefill_reps=3, layers=None, backend=None, merge=False, table=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _load(tmp_path):
    (js,) = tmp_path.glob("*-e2e-dryrun.json")
    return js, json.loads(js.read_text())


def _bsr_bytes(b: int, density: float) -> int:
    """Packed bytes of TINY's decoder Linears as b x b blocks: round(density x blocks) fp32 blocks per layer
    (random_block_mask keeps exactly that many) + int32 crow (row blocks + 1) and col (one per kept block)."""
    h, f, kv = e2e.TINY["hidden_size"], e2e.TINY["intermediate_size"], 2 * 32
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]
    total = 0
    for n, k in shapes:
        nnz = round(density * (n // b) * (k // b))
        total += nnz * b * b * 4 + (n // b + 1) * 4 + nnz * 4
    return total * e2e.TINY["num_hidden_layers"]


def test_dry_run_every_variant_kind_and_mode(tmp_path, capsys):
    assert e2e.run_cli(_args(tmp_path, batches="2")) == 0
    js, res = _load(tmp_path)
    assert res["complete"] and res["failures"] == {}
    assert res["env"]["dry_run"] and res["settings"]["backend"] == "reference"
    rows = res["rows"]
    assert {(r["variant"], r["mode"]) for r in rows} == {
        (v, m) for v in ("dense", "2:4", "32x32-50", "64x64-90") for m in e2e.MODES}
    assert all(r["batch"] == 2 and r["prompt"] == 16 for r in rows)
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 and r["ttft_ms"] >= r["prefill_ms"] * 0.5
        assert r["decode_tok_s"] == pytest.approx(2 * r["decode_tokens"] / (r["decode_ms"] * r["decode_tokens"]) * 1e3)
        assert r["kv_bytes"] == 2 * 2 * 2 * 2 * 32 * (16 + 2 + 2 + 4 + 8) * 4  # K and V, layers, batch, heads, dim, len (+8 slack), fp32
        assert r["speedup"] is not None and r["speedup_same_mode"] is not None
    by = {(r["variant"], r["mode"]): r for r in rows}
    # compiled modes are stand-ins on a CPU, and say so
    assert "stand-in" in by[("2:4", "inductor")]["mode_impl"]
    # speedups are against the best dense mode of the same run
    best_dense = max(by[("dense", m)]["decode_tok_s"] for m in e2e.MODES)
    for v in ("2:4", "64x64-90"):
        best = max(by[(v, m)]["decode_tok_s"] for m in e2e.MODES)
        assert by[(v, "eager")]["speedup"] == pytest.approx(best / best_dense)
    # byte accounting: the decoder Linears shrink as the format says; embeddings and LM head stay dense
    assert by[("dense", "eager")]["linear_ratio"] == 1.0
    assert by[("2:4", "eager")]["linear_ratio"] == pytest.approx(0.5 + 1 / 32)  # fp32 values + 2-bit positions
    for v, b, d in (("64x64-90", 64, 0.1), ("32x32-50", 32, 0.5)):
        assert by[(v, "eager")]["linear_bytes"] == _bsr_bytes(b, d)
    dense_other = by[("dense", "eager")]["checkpoint_bytes"] - by[("dense", "eager")]["linear_bytes"]
    for r in rows:
        assert r["checkpoint_bytes"] - r["linear_bytes"] == dense_other
    md = js.with_suffix(".md").read_text()
    assert "DRY RUN" in md and "| 64x64-90 |" in md
    assert "2:4, batch 1 decode: target >= 1.5x dense: **not measured**" in md  # batch 2 only so far
    assert js.with_suffix(".png").stat().st_size > 10_000

    # --merge folds a second run (another batch and prompt, its own dense baseline) into the same file
    assert e2e.run_cli(_args(tmp_path, variants="2:4", batches="1", prompts="8", modes="eager", merge=True)) == 0
    _, merged = _load(tmp_path)
    assert len(merged["rows"]) == len(rows) + 2
    new = [r for r in merged["rows"] if r["prompt"] == 8]
    assert {r["variant"] for r in new} == {"dense", "2:4"} and len({r["run_id"] for r in new}) == 1
    assert new[0]["run_id"] not in {r["run_id"] for r in rows}
    md = js.with_suffix(".md").read_text()
    assert "2:4, batch 1 decode, prompt 8:" in md and "dry run: no verdict" in md  # never "met" on a CPU
    capsys.readouterr()
    assert e2e.run_cli(_args(tmp_path, table=str(_load(tmp_path)[0]))) == 0
    table = capsys.readouterr().out
    assert "| 8 | 1 | 2:4 |" in table and "| 16 | 2 | 64x64-90 |" in table
    assert "DRY RUN (CPU, tiny config" in table.splitlines()[0]  # never pasted as GPU numbers by mistake
    with pytest.raises(FileNotFoundError, match="dry runs are never picked as the latest: give the file"):
        e2e.run_cli(_args(tmp_path, table="latest"))


def test_dry_run_through_the_triton_kernels(tmp_path):
    """The harness with the kernels forced (Triton interpreter on a CPU): one block variant, eager."""
    args = _args(tmp_path, variants="64x64-90", batches="1", prompts="8", modes="eager", decode_tokens=2,
                 backend="triton")
    assert e2e.run_cli(args) == 0
    _, res = _load(tmp_path)
    assert res["failures"] == {} and res["settings"]["backend"] == "triton"
    sparse = [r for r in res["rows"] if r["variant"] == "64x64-90"]
    assert sparse and sparse[0]["backends"] == ["triton (forced by SPARSERUN_BACKEND)"]


def test_checkpoint_bytes_match_a_saved_checkpoint(tmp_path):
    """checkpoint_bytes (computed, nothing written) == the tensor bytes sparserun.save writes."""
    import sparserun
    from sparserun.cli import inspect_summary

    model = e2e.build_skeleton(e2e.TINY, "cpu", torch.float32)
    for name in ("2:4", "32x32-70"):
        (variant,) = [v for v in e2e.all_variants() if v.name == name]
        e2e.apply_variant(model, variant, "cpu", torch.float32, progress=False)
        sizes = e2e.model_bytes(model)
        out = sparserun.save(model, tmp_path / name.replace(":", "of"))
        t = inspect_summary(out)["totals"]
        assert sizes["linear_bytes"] == t["sparse_layers"]["nbytes"]
        non_persistent = sum(b.numel() * b.element_size() for m in model.modules()
                             for n, b in m._buffers.items() if n in m._non_persistent_buffers_set)
        assert sizes["checkpoint_bytes"] - non_persistent == t["sparse_layers"]["nbytes"] + t["dense_tensors"]["nbytes"]
        e2e.clear_variant(model)
        assert all(model.get_submodule(n).weight.device.type == "meta" for n in e2e.decoder_linear_names(model))


def test_variant_names_and_errors():
    assert [v.name for v in e2e.parse_variants("64x64-90,2:4")] == ["dense", "64x64-90", "2:4"]
    assert len(e2e.parse_variants("all")) == 8
    with pytest.raises(ValueError, match="unknown variant"):
        e2e.parse_variants("16x16-50")
    g = e2e.parse_variants("2:4+g,2:4")
    assert [v.name for v in g] == ["dense", "2:4+g", "2:4"] and g[1].grouped and not g[2].grouped
    with pytest.raises(ValueError, match="unknown variant"):
        e2e.parse_variants("dense+g")  # nothing to group in the dense baseline


def test_grouped_variant_groups_siblings():
    model = e2e.build_skeleton(dict(e2e.TINY), "cpu", torch.float32)
    e2e.apply_variant(model, e2e.parse_variants("2:4+g")[1], "cpu", torch.float32, progress=False)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.__dict__["_sr_group"] is layer.self_attn.v_proj.__dict__["_sr_group"]
    assert layer.mlp.gate_proj.__dict__["_sr_group"] is layer.mlp.up_proj.__dict__["_sr_group"]
    assert "_sr_group" not in layer.self_attn.o_proj.__dict__
    e2e.clear_variant(model)
    with pytest.raises(ValueError, match="unknown mode"):
        e2e.run(dry_run=True, modes=("fast",), out_dir=None, say=lambda *a: None)


@pytest.mark.gpu
def test_e2e_gpu_path_small_model(tmp_path):
    """The real GPU path on a small Llama (4 layers, hidden 1024): CUDA graphs capture (no skips), memory is
    measured, every mode of every variant kind produces a row. Run this before a long Llama-8B run."""
    cfg = dict(e2e.LLAMA_31_8B, num_hidden_layers=4, hidden_size=1024, intermediate_size=3584,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    variants = e2e.parse_variants("2:4,64x64-90")  # + dense: 6 compiles of a 4-layer model
    res = e2e.run(config_kw=cfg, variants=variants, batches=(1,), prompts=(64,), decode_tokens=16,
                  out_dir=tmp_path)
    assert res["failures"] == {}, res["failures"]
    assert len(res["rows"]) == 3 * len(e2e.MODES)
    for r in res["rows"]:
        if r["mode"] != "eager":
            assert r["cudagraph_skips"] == 0, r
        assert r["peak_decode_bytes"] >= r["weights_bytes"] + r["kv_bytes"]
        assert r["peak_prefill_bytes"] >= r["weights_bytes"]
    (js,) = tmp_path.glob("*-e2e.json")
    assert "DRY RUN" not in js.with_suffix(".md").read_text()


def _row(run_id, variant, mode, tok_s, prefill_ms=10.0):
    return dict(run_id=run_id, variant=variant, mode=mode, batch=1, prompt=128, decode_tok_s=tok_s,
                prefill_ms=prefill_ms)


def test_best_mode_table_divides_the_rows_it_prints():
    """Merged runs: dense's best mode is in run B, a variant's best in run A. The table's speedup is the ratio
    of the two rows it shows side by side, not the variant's speedup over run A's slower dense."""
    res = {"rows": [_row("A", "dense", "cudagraphs", 110.0, 20.0), _row("A", "64x64-50", "cudagraphs", 121.5),
                    _row("B", "dense", "inductor", 141.2, 25.0), _row("B", "64x64-50", "inductor", 100.0)]}
    e2e.summarize(res)
    assert [r["speedup"] for r in res["rows"] if r["variant"] == "64x64-50"][0] == pytest.approx(121.5 / 110)
    best = {r["variant"]: r for r in e2e.best_rows(res)}
    assert best["dense"]["decode_tok_s"] == 141.2 and best["dense"]["speedup"] == pytest.approx(1.0)
    assert best["64x64-50"]["speedup"] == pytest.approx(121.5 / 141.2)  # slower than the dense row shown
    assert best["64x64-50"]["dense_best_mode"] == "inductor"
    assert best["64x64-50"]["prefill_speedup"] == pytest.approx(20.0 / 10.0)
    assert res["rows"][1]["speedup"] == pytest.approx(121.5 / 110)  # the per-run rows are left as measured


def test_merge_refuses_a_run_of_another_model(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSERUN_BACKEND", raising=False)
    threads = torch.get_num_threads()
    quick = dict(variants="dense", batches="1", prompts="8", modes="eager", decode_tokens=1)
    assert e2e.run_cli(_args(tmp_path, layers=1, **quick)) == 0
    with pytest.raises(ValueError, match=r"--merge: .* another config"):
        e2e.run_cli(_args(tmp_path, layers=2, merge=True, **quick))
    _, res = _load(tmp_path)
    assert res["config"]["num_hidden_layers"] == 1 and len(res["rows"]) == 1  # the file is untouched
    # a refused run leaves the process as it found it (the backend it forces, the thread count)
    assert "SPARSERUN_BACKEND" not in os.environ and torch.get_num_threads() == threads


@pytest.mark.parametrize("bad, match", [(dict(layers=0), "--layers must be at least 1, got 0"),
                                        (dict(batches="0"), "--batches takes positive integers, got 0"),
                                        (dict(prompts="8,-1"), "--prompts takes positive integers, got 8,-1")])
def test_bad_sizes_are_refused_before_the_model_is_built(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        e2e.run_cli(_args(tmp_path, variants="dense", modes="eager", **bad))
    assert not list(tmp_path.iterdir())
