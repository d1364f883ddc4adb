"""`sparserun.prune(model, method, pattern, ...)`: one-shot pruning in memory, with an honest report.

The model is changed in place: every chosen Linear is left as a *masked dense* weight (sparsegpt also
updates the kept weights), and the report holds the explicit masks, ready for
`sparserun.sparsify_(model, pattern=..., masks=report.masks)`, which packs them; then `sparserun.save`
(saved before packing, the masked dense weights take as much space as the original).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..patterns import parse
from ..runtime import experts
from . import calibrate, masks, scores

COLUMNS = ("layer", "pattern", "format", "sparsity", "rel.err", "before", "after", "note")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class PruneReport:
    """What pruning did, per Linear layer, and what it cost.

    rows:   one dict per Linear in the repeated layers (and lm_head if asked): name, pattern, format, shape,
            dtype, status ("pruned" | "dense": the pattern cannot hold its shape | "skipped": matched skip),
            reason, sparsity (fraction of weights removed), rel_error (‖Wx − W'x‖ / ‖Wx‖ over the calibration
            tokens, with x the inputs the layer sees in the already-pruned model), bytes_before (dense
            weight), bytes_after (packed weight; = before for dense rows)
    masks:  {layer name: bool mask (True = kept)} on the CPU (empty when a converter did not keep them)
    """

    method: str
    pattern: str
    sparsity: float
    calib: dict
    rows: list = field(default_factory=list)
    masks: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def pruned(self) -> list:
        return [r for r in self.rows if r["status"] == "pruned"]

    def totals(self) -> dict:
        pr = self.pruned
        before = sum(r["bytes_before"] for r in self.rows)
        after = sum(r["bytes_after"] for r in self.rows)
        weights = sum(r["shape"][0] * r["shape"][1] for r in self.rows)
        removed = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in pr)
        errs = [r["rel_error"] for r in pr if r.get("rel_error") is not None]
        return {"layers": len(self.rows), "pruned": len(pr),
                "dense": sum(r["status"] == "dense" for r in self.rows),
                "skipped": sum(r["status"] == "skipped" for r in self.rows),
                "sparsity": round(removed / weights, 6) if weights else 0.0,
                "mean_rel_error": round(sum(errs) / len(errs), 6) if errs else None,
                "max_rel_error": round(max(errs), 6) if errs else None,
                "bytes_before": before, "bytes_after": after,
                "ratio": round(after / before, 4) if before else None}

    def warnings(self) -> list[str]:
        """What did not get what pruning is for: no layer pruned at all (every shape refused the pattern, or the
        target rounds to zero blocks), a packed form no smaller than dense (a sparsity too low for the format's
        index), layers pruned far past the target by block rounding, calibration text the tokenizer cannot read,
        experts calibration never reached, 3-D tensors no Linear holds, a checkpoint no smaller than its source."""
        pr = self.pruned
        larger = [r for r in pr if r["bytes_after"] >= r["bytes_before"]]
        out = []
        if not pr and self.rows:
            r = next((r for r in self.rows if r["status"] == "dense"), self.rows[0])
            out.append(f"warning: no layer was pruned, so the result is the dense model (e.g. {r['name']}: "
                       f"{r['reason']})")
        if larger:
            r = larger[0]
            sizes = [human_bytes(r["bytes_before"]), human_bytes(r["bytes_after"])]
            if sizes[0] == sizes[1]:  # rounded alike: show the bytes, or the example shows no difference
                sizes = [f"{r['bytes_before']} B", f"{r['bytes_after']} B"]
            out.append(f"warning: {len(larger)} layer(s) are not smaller packed than dense (e.g. {r['name']}: "
                       f"{sizes[0]} -> {sizes[1]}): at "
                       f"{100 * r['sparsity']:.1f}% the {r['format']} index costs more than the removed weights")
        # rounding to whole blocks can overshoot: 2 blocks per row at 75 % keeps round(0.5) = 0 of them
        # (a layer pruned to nothing is named even at a 90 % target, where +10 points would be 100 % itself)
        over = [r for r in pr if self.sparsity is not None
                and (r["sparsity"] > min(1.0, self.sparsity + 0.1) or r["sparsity"] >= 1.0 > self.sparsity)]
        if over:
            r = max(over, key=lambda r: r["sparsity"])
            empty = sum(r["sparsity"] >= 1.0 for r in over)
            out.append(f"warning: {len(over)} layer(s) were pruned far past the {100 * self.sparsity:.0f}% target"
                       + (f", {empty} of them to nothing" if empty else "")
                       + f" (e.g. {r['name']}, {r['shape'][0]}x{r['shape'][1]}: {100 * r['sparsity']:.1f}%): "
                       f"whole {r['pattern']} blocks round that way at this shape; lower the sparsity, use smaller "
                       f"blocks, or leave out --balance-rows")
        under = [r for r in pr if self.sparsity is not None and r["sparsity"] < self.sparsity - 0.1]
        if under:  # the other way round: few blocks per row, rounded down
            r = min(under, key=lambda r: r["sparsity"])
            out.append(f"warning: {len(under)} layer(s) were pruned far below the {100 * self.sparsity:.0f}% target "
                       f"(e.g. {r['name']}, {r['shape'][0]}x{r['shape'][1]}: {100 * r['sparsity']:.1f}%): whole "
                       f"{r['pattern']} blocks round that way at this shape; use smaller blocks for such layers")
        silent = [r for r in pr if r.get("rel_error") is not None and r["rel_error"] >= 0.999]
        if silent:
            out.append(f"warning: {len(silent)} layer(s) output (almost) nothing on the calibration tokens after "
                       f"pruning (relative error {silent[0]['rel_error']:.4f}, e.g. {silent[0]['name']}): the weights "
                       f"they keep meet inputs that are zero in the pruned model; lower the sparsity or use smaller "
                       f"blocks")
        unreached = [r for r in pr if r["reason"] == calibrate.UNREACHED_REASON]
        if unreached:
            out.append(f"warning: {len(unreached)} layer(s) saw no calibration token (e.g. {unreached[0]['name']}, "
                       f"an MoE expert the router never chose) and were pruned by magnitude; more calibration "
                       f"text (--nsamples) reaches more experts")
        zero = [r for r in pr if r["reason"] in (calibrate.ZERO_INPUT_REASON, calibrate.ZERO_GRAD_REASON)]
        if zero:
            out.append(f"warning: {len(zero)} layer(s) had an all-zero calibration statistic and were pruned by "
                       f"magnitude (e.g. {zero[0]['name']}: {zero[0]['reason'].split(': pruned')[0]})")
        c = self.calib or {}
        if c.get("text_tokens") and c.get("seqlen") and c["text_tokens"] < 4 * c["seqlen"]:
            # windows are drawn at random from the text: fewer than ~4 windows' worth is the same few tokens over
            # and over (the shipped text gives 10 windows' worth at the default 512)
            out.append(f"warning: the calibration text has only {c['text_tokens']} tokens, "
                       f"{c['text_tokens'] / c['seqlen']:.1f} windows of {c['seqlen']}: the {c.get('nsamples')} "
                       f"windows drawn from it repeat the same tokens (each used {c.get('coverage')}x on average); "
                       f"give more text, or shorter windows (--seqlen)")
        unknown = calibrate.unknown_warning(c.get("unknown_tokens", 0.0), c.get("text_tokens"),
                                            f"the calibration text {c.get('source')}", c.get("unk_token"))
        if unknown:
            out.append(f"warning: {unknown}")
        if self.info.get("unused_tensors"):
            out.append(f"warning: {self.info['unused_tensors']} stored tensor(s) the {self.info.get('architecture')} "
                       f"has no place for were left out (e.g. {self.info['unused_example']}); check that config.json "
                       f"names the right architecture")
        ck, sb = self.info.get("checkpoint_bytes"), self.info.get("source_bytes")
        if ck and sb and ck >= sb:
            why = ("the pruned layers are too small a part of the model, or pruned too little, to pay for their "
                   "index")
            if self.info.get("dtype") != self.info.get("source_dtype"):
                why = (f"it is stored in {self.info.get('dtype')}, the source in {self.info.get('source_dtype')}; "
                       f"leave out --dtype, or give the source's")
            out.append(f"warning: the checkpoint ({human_bytes(ck)}) is not smaller than the source's weights "
                       f"({human_bytes(sb)}): {why}")
        frac = self.info.get("unpruned_3d_fraction") or 0
        if frac >= 0.1:
            out.append(f"warning: {100 * frac:.0f}% of the parameters are 3-D tensors that no Linear layer holds "
                       f"(e.g. {self.info.get('unpruned_3d_example')}: MoE experts outside transformers' experts "
                       f"contract); they stay dense")
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity,
                "calibration": self.calib, **self.info, "totals": self.totals(), "warnings": self.warnings(),
                "layers": self.rows}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        lines = []
        # the experts of one MoE module that agree on everything but their numbers are one line (rows keep all)
        same = lambda r: (r["pattern"], r["format"], r["status"], r["reason"], tuple(r["shape"]))  # noqa: E731
        for g in experts.group_experts(self.rows, lambda r: r["name"], same):
            r, n = g[0], sum(math.prod(x["shape"]) for x in g)
            errs = [x["rel_error"] for x in g if x.get("rel_error") is not None]
            sparsity = sum(x["sparsity"] * math.prod(x["shape"]) for x in g) / n if n else 0.0
            note = "; ".join(t for t in (r["reason"], "rel.err: mean over the experts" if len(errs) > 1 else "") if t)
            lines.append((experts.group_name(g, lambda x: x["name"]), r["pattern"], r["format"],
                          f"{100 * sparsity:.1f}%", f"{sum(errs) / len(errs):.4f}" if errs else "-",
                          human_bytes(sum(x["bytes_before"] for x in g)), human_bytes(sum(x["bytes_after"] for x in g)),
                          note))
        t = self.totals()
        lines.append(("total", self.pattern, "", f"{100 * t['sparsity']:.1f}%",
                      "-" if t["mean_rel_error"] is None else f"{t['mean_rel_error']:.4f} mean",
                      human_bytes(t["bytes_before"]), human_bytes(t["bytes_after"]),
                      f"{t['pruned']} pruned, {t['dense']} kept dense, {t['skipped']} skipped"))
        rows = [COLUMNS] + lines
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        out = []
        for j, r in enumerate(rows):
            # text columns left, numbers right; no padding after the last column
            cells = [c.ljust(w) if i in (0, 1, 2) else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r[:-1], widths[:-1]))] + [r[-1]]
            out.append("  ".join(cells).rstrip())
            if j == 0 or j == len(rows) - 2:
                out.append("-" * min(sum(widths) + 2 * len(widths), 160))
        outside = self.info.get("dense_outside") or []
        if outside:
            out.append(f"not pruned: {len(outside)} Linear layer(s) outside {self.info.get('layers_path')} "
                       f"(only the repeated layers are pruned), e.g. {', '.join(outside[:3])}")
        out.extend(self.warnings())
        frac = self.info.get("pruned_param_fraction")
        if frac is not None:
            out.append(f"the pruned layers hold {100 * frac:.1f}% of the model's parameters")
        ck, sb = self.info.get("checkpoint_bytes"), self.info.get("source_bytes")
        if ck and sb:  # "total" above is the pruned layers only; this is what the user's disk sees
            out.append(f"checkpoint: {human_bytes(ck)} of tensors, against {human_bytes(sb)} in the source "
                       f"({ck / sb:.3f}x)")
        src = self.calib.get("source", "?")
        text = f" from {self.calib['text_tokens']} tokens of text" if self.calib.get("text_tokens") else ""
        head = (f"{self.method} {self.pattern} at {100 * self.sparsity:.1f}% target; calibration: {src} "
                f"({self.calib.get('nsamples')} x {self.calib.get('seqlen')} tokens{text})")
        return head + "\n" + "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def check_args(method: str, pattern, sparsity) -> tuple[str, str, float]:
    """Validate method / pattern / sparsity together; returns (method, pattern string, sparsity)."""
    m = scores.check_method(method)
    pat = parse(pattern)
    s = masks.resolve_sparsity(pat, sparsity)
    return m, str(pat), s


_OPTION_NAMES = {"per_row", "balance_rows", "blocksize", "percdamp", "seed", "include_lm_head"}


def check_options(pattern: str, options: calibrate.Options) -> None:
    """An option that cannot apply to the pattern is an error, not silently ignored."""
    kind = parse(pattern).kind
    if options.balance_rows and kind != "block":
        raise ValueError(f"balance_rows (--balance-rows) applies to block patterns such as 32x32, not {pattern}")
    if options.per_row is not None and kind != "unstructured":
        raise ValueError(f"per_row (--per-row) applies to unstructured sparsity, not {pattern} (N:M and blocks "
                         f"are chosen per group / block-row by construction)")
    # sparsegpt's lazy column block and dampening: a blocksize <= 0 was clamped silently, a negative dampening
    # failed inside the first layer's Cholesky
    if not (isinstance(options.blocksize, int) and not isinstance(options.blocksize, bool) and options.blocksize > 0):
        raise ValueError(f"blocksize must be a positive integer, got {options.blocksize!r}")
    if not (isinstance(options.percdamp, (int, float)) and 0 <= options.percdamp < float("inf")):
        raise ValueError(f"percdamp must be a finite number >= 0, got {options.percdamp!r}")


def check_skip(model: nn.Module, skip: str | None, include_lm_head: bool) -> None:
    """A --skip regex that matches none of the layers pruning would touch is most likely a typo, and one that
    matches all of them leaves nothing to prune: both are errors, before any data is read."""
    if not skip:
        return
    import re

    try:
        re.compile(skip)
    except (re.error, TypeError) as e:
        raise ValueError(f"skip {skip!r} is not a regular expression ({e})") from None
    names = calibrate.stack_linear_names(model)
    if include_lm_head:
        names.append(calibrate.output_projection(model)[0])
    hit = [n for n in names if re.search(skip, n)]
    if not hit:
        raise ValueError(f"--skip {skip!r} matches none of the {len(names)} Linear layers to prune (e.g. "
                         f"{', '.join(names[:2])})")
    if len(hit) == len(names):
        raise ValueError(f"--skip {skip!r} matches all {len(names)} Linear layers to prune: nothing would be pruned")


def prune(model: nn.Module, method: str, pattern, sparsity: float | None = None, calib=None, *,
          nsamples: int = calibrate.DEFAULT_NSAMPLES, seqlen: int | None = None, tokenizer=None,
          skip: str | None = None, device=None, progress: bool = True, **opts) -> PruneReport:
    """Prune `model` in place, one repeated layer at a time; return a PruneReport.

    method:    magnitude | wanda | sparsegpt | taylor | obd
    pattern:   "unstructured", "N:M" (e.g. "2:4", "4:8"), "BxB" (e.g. "32x32")
    sparsity:  fraction removed, in (0, 1); N:M implies 1 - N/M; unstructured and blocks need it
    calib:     None (the shipped default text), a file (plain text, JSONL, or a .json list of texts), a list
               of strings, or a LongTensor [n, T] of token ids (then nsamples / seqlen / tokenizer are not used)
    seqlen:    default min(512, the model's max_position_embeddings)
    tokenizer: needed for text calibration; default: AutoTokenizer of model.name_or_path if that is a
               local directory
    skip:      regex; Linear layers whose full name matches stay dense (and are reported as skipped)
    device:    where each layer is processed (default: cuda if the model is there, else cpu)
    opts:      per_row (unstructured: same sparsity in every row; default True for wanda, as in the
               paper, and for taylor / obd, see calibrate.Options; False for magnitude and sparsegpt),
               balance_rows (blocks: same number of kept blocks in every block-row), blocksize and
               percdamp (sparsegpt), seed (calibration windows, encoder gradient directions),
               include_lm_head (also prune the output projection; default False: it stays dense)
    """
    method, pattern, sparsity = check_args(method, pattern, sparsity)
    from ..runtime.linear import unwrap

    model = unwrap(model)  # torch.compile'd or DataParallel: the model it runs is inside
    unknown = set(opts) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"prune() got unknown option(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(sorted(_OPTION_NAMES))}")
    include_lm_head = bool(opts.pop("include_lm_head", False))
    options = calibrate.Options(**opts)
    check_options(pattern, options)
    calibrate.find_layers(model)  # an unknown family fails before any data is read
    # MoE experts held as 3-D parameters are pruned as one Linear pair per expert (runtime/experts.py), then
    # the module gets its own 3-D parameters back, so the pruned model keeps the layout transformers saves
    unrolled = experts.unroll_all(model)
    try:
        check_skip(model, skip, include_lm_head)
        # layers are pruned in place one after another: a NaN found at the last one left the first ones pruned
        from ..formats.common import check_weight_finite
        from ..runtime.linear import is_linear, linear_weight

        for name, m in model.named_modules():
            if is_linear(m) and m.weight.device.type != "meta":
                check_weight_finite(linear_weight(m).detach(), name)
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None and p.device.type == "cuda" else torch.device("cpu")
        else:  # before any layer moves there: prune(device="meta") left the embeddings without data
            from ..convert import resolve_device

            device = resolve_device(device)
        cal = load_calibration(model, calib, tokenizer, nsamples, seqlen, options.seed)
        rows, kept, info = calibrate.prune_layerwise(
            model, method, pattern, sparsity, cal, device=device, skip=skip, options=options,
            include_lm_head=include_lm_head, progress=progress)
    finally:
        experts.fuse_all(model, unrolled)
    return PruneReport(method, pattern, sparsity, cal.describe(), rows, kept, info)


# model types whose learned position ids are counted from pad_token_id + 1 (create_position_ids_from_input_ids)
PADDING_OFFSET_POSITIONS = frozenset(("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                                      "roberta-prelayernorm", "xmod", "data2vec-text", "ibert", "mpnet", "luke",
                                      "markuplm", "esm"))


def position_limit(config) -> tuple[int | None, str]:
    """(the model's position limit, the config.json field it comes from), or (None, "") for a model without
    one (T5's relative positions; XLNet's -1). GPT-2's n_positions also answers to max_position_embeddings.
    A composite config (a VLM's) keeps the limit in its text config, named as text_config.<field>."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        # name the field as config.json spells it, so the user can find it
        field = getattr(config, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")
        pad = getattr(config, "pad_token_id", None)
        if getattr(config, "model_type", None) in PADDING_OFFSET_POSITIONS and isinstance(pad, int) and pad >= 0:
            # RoBERTa-style positions start after the padding index: 514 positions hold 512 tokens
            return limit - pad - 1, f"{field} - pad_token_id - 1"
        return limit, field
    limit = getattr(config, "n_positions", None)
    if isinstance(limit, int) and limit > 0:
        return limit, "n_positions"
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        limit, field = position_limit(text)
        if limit:
            sub = next((k for k, v in vars(config).items() if v is text), "text_config")
            return limit, f"{sub}.{field}"
    return None, ""


def default_seqlen(config) -> int:
    limit, _ = position_limit(config)
    return min(calibrate.DEFAULT_SEQLEN, limit) if limit else calibrate.DEFAULT_SEQLEN


def load_calibration(model, calib, tokenizer, nsamples, seqlen, seed) -> calibrate.CalibData:
    """Calibration windows for `model` (checks seqlen against its position limit)."""
    config = getattr(model, "config", None)
    limit, field = position_limit(config)
    for what, v in (("nsamples", nsamples), ("seqlen", seqlen)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):  # 2.5 failed inside randint
            raise calibrate.CalibrationError(f"{what} must be an integer, got {v!r}")
    if isinstance(tokenizer, (str, os.PathLike)):  # a directory, as --tokenizer takes it
        from ..checkpoint import read_tokenizer

        try:
            tokenizer = read_tokenizer(tokenizer)
        except Exception as e:
            raise calibrate.CalibrationError(f"cannot load a tokenizer from {tokenizer} ({type(e).__name__})") from None
    if isinstance(calib, torch.Tensor):
        cal = calibrate.calibration_data(calib, seed=seed)
        seqlen = cal.seqlen
    else:
        seqlen = seqlen if seqlen is not None else default_seqlen(config)
    if limit and seqlen > limit:
        raise calibrate.CalibrationError(f"seqlen {seqlen} exceeds the model's {field} {limit}")
    if isinstance(calib, torch.Tensor):
        return _check_ids(model, cal)
    if tokenizer is None:
        tokenizer = _tokenizer_for(model)
    return _check_ids(model, calibrate.calibration_data(calib, tokenizer, nsamples, seqlen, seed))


def check_token_ids(model, ids: torch.Tensor, what: str, error=calibrate.CalibrationError) -> None:
    """Token ids must index the model's embedding table (a tokenizer of another model, or pre-tokenised ids
    for another vocabulary, would otherwise end in an IndexError deep inside the embedding). `what` names the
    ids and the model in the message."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (n is not None and hi >= n):
        raise error(f"{what}: token ids span [{lo}, {hi}] but the model's embedding has {n} rows: tokenise with "
                    f"the model's own tokenizer")


def _check_ids(model, cal: calibrate.CalibData) -> calibrate.CalibData:
    check_token_ids(model, cal.input_ids, f"calibration ({cal.source})")
    return cal


def _tokenizer_for(model):
    import os

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    if path and os.path.isdir(path):
        from ..checkpoint import read_tokenizer

        try:
            return read_tokenizer(path)
        except Exception as e:  # transformers raises many types for a directory without tokenizer files
            raise calibrate.CalibrationError(f"cannot load a tokenizer from {path} ({type(e).__name__}); "
                                             f"pass tokenizer= or pre-tokenised calib=") from None
    raise calibrate.CalibrationError("calibration text needs the model's tokenizer: pass tokenizer= (or "
                                     "pre-tokenised input_ids as calib=)")

