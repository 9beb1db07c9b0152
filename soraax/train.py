"""Training: `python -m soraax.train --config configs/tiny.py --workdir runs/tiny [--config.KEY=VALUE ...]`.

One loop for the tasks of a config: `dit` (the diffusion transformer with its text encoder, on packed
latent patches), `vae` (the causal video VAE, on fixed-size crops) and `sr` (a super-resolution stage of a
cascade: the DiT also seeing the upsampled low-res latent, on its base's frozen VAE; soraax/cascade.py). A
DiT config whose `vae.checkpoint` is empty trains its VAE first, into WORKDIR/vae. The loop only moves data, calls the
jitted step, logs and saves; everything else is a pure function of `(state, batch, rng)`.

Flags: --config FILE, --workdir DIR, --config.KEY=VALUE, --dry_run (sizes and the batch/mesh it would
use, nothing allocated), --compile_only (lower and compile the step, print its memory and FLOPs), --topology NAME (with
--compile_only: compile for a TPU slice such as v5p-64 from a CPU machine; see soraax/topology.py).
A rerun with the same workdir resumes from the latest checkpoint and says so.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before JAX loads: XLA's CPU buffers on huge pages (soraax/host_memory.py)
    from soraax import host_memory
    host_memory.reexec_with_huge_pages()

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm

from soraax import cascade, checkpoints, config as config_lib, curriculum, diffusion, distributed, flops, packing, preemption
from soraax import sharding, weights
from soraax import topology
from soraax.data import pipeline
from soraax.models import Models, build, build_vae
from soraax.text.dropout import drop_caption_states, drop_captions
from soraax.text.encoders import CaptionStates, empty_caption_states, frozen_params
from soraax.vae import VideoVAE, encode_mean, latent_channel_stats, vae_loss

LATENT_STATS_FILE = "latent_stats.json"
log = logging.getLogger("soraax.train")


@flax.struct.dataclass
class TrainState:
    """`params` are trained (with their EMA and optimizer state); `frozen` (a pretrained text encoder run
    inside the step) is an input the step never updates, read from its own folder, never checkpointed."""
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    frozen: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between training the DiT and the VAE; the loop is shared."""
    name: str
    init_params: Callable[[jax.Array], Any]               # key -> trained params (logically boxed)
    loss_fn: Callable[[Any, dict, jax.Array], tuple]      # (params, batch, rng) -> (loss, metrics)
    batches: Callable[[int, int], Any]                    # (process_index, process_count) -> IterDataset
    batch_specs: dict[str, jax.sharding.PartitionSpec]    # per batch key
    token_counts: Callable[[dict], tuple[int, int]]       # host batch -> (real tokens, slots)
    total_steps: int
    learning_rate: float
    frozen_abstract: Callable[[], Any] = dict             # () -> frozen params' abstract (logically boxed)
    load_frozen: Callable[[Any], Any] | None = None       # shardings -> frozen params placed in them


# ------------------------------------------------------------------------------------------ the step


class NonFiniteError(RuntimeError):
    """The loss or gradients stayed non-finite for `max_nonfinite_steps` steps in a row."""


class Preempted(Exception):
    """The run saved at `step` and stopped because it was asked to (SIGTERM, JAX's preemption notice)."""

    def __init__(self, step: int, workdir: str, reason: str):
        super().__init__(f"preempted ({reason}) at step {step}: saved a checkpoint in {workdir}; "
                         "rerun the same command to resume")
        self.step = step


def make_optimizer(cfg, learning_rate: float, total_steps: int):
    """AdamW with warmup + cosine decay and clipping, inside `optax.apply_if_finite`: a step whose gradients
    hold a NaN or Inf changes nothing (params, moments, schedule count) and is counted. Its give-up count is
    never reached (the loop stops the run after `max_nonfinite_steps` skips in a row instead), so NaN
    updates are never applied."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=min(cfg.warmup_steps, max(total_steps - 1, 0)),
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=0.1 * learning_rate)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**30), schedule


def make_train_step(loss_fn, tx, schedule, ema_decay: float):
    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)

        def trained_loss(params):  # differentiated in the trained params only: frozen ones get no gradient
            return loss_fn({**params, **state.frozen}, batch, rng)
        (loss, metrics), grads = jax.value_and_grad(trained_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                            state.ema_params, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step),
                   # apply_if_finite's counters: skipped steps in a row (the loop's stop rule), and in all.
                   "nonfinite_streak": opt_state.notfinite_count, "skipped_updates": opt_state.total_notfinite}
        return TrainState(state.step + 1, params, ema_params, opt_state, state.frozen), metrics
    return train_step


def text_conditioning(models: Models, cfg, empty_states=None):
    """(params, batch, key) -> (text_states, text_segment_ids) after caption dropout.

    Cached states (`empty_states` given: the frozen encoder's states of the empty caption) come in the
    batch; otherwise the encoder runs here on the dropped-out tokens, params["text"] trained or frozen.
    """
    rate, max_segments = cfg.diffusion.text_dropout, cfg.max_segments
    # model.text_pad_len (Wan): the packer gave each caption that many slots, its padding zero states, and
    # the DiT attends to all of them, as Wan's pipeline and soraax's sampler do. A dropped caption is the
    # empty caption's states then zeros over the same slots: Wan's unconditional input.
    attend_padding = int(cfg.model.get("text_pad_len", 0)) > 0
    if empty_states is not None:
        def cached(params, batch, key):
            states, segment_ids = drop_caption_states(key, batch["text_states"], batch["text_segment_ids"],
                                                      max_segments=max_segments, rate=rate,
                                                      empty_states_ExT=empty_states)
            return states, batch["text_segment_ids"] if attend_padding else segment_ids
        return cached

    def encoded(params, batch, key):
        tokens, segment_ids = drop_captions(key, batch["text_tokens"], batch["text_segment_ids"],
                                            max_segments=max_segments, rate=rate,
                                            empty_ids=models.tokenizer.empty_ids)
        if not attend_padding:
            return models.text_encoder.apply({"params": params["text"]}, tokens, segment_ids), segment_ids
        # The encoder sees each caption alone (its pad tokens masked, as Wan's UMT5 call masks them); its
        # states there are zeroed, and the DiT attends to them under the caption's own segment id.
        encoder_ids = jnp.where(tokens == models.tokenizer.pad_id, 0, segment_ids)
        states = models.text_encoder.apply({"params": params["text"]}, tokens, encoder_ids)
        return jnp.where((encoder_ids != 0)[..., None], states, 0).astype(states.dtype), batch["text_segment_ids"]
    return encoded


def lowres_conditioning(models: Models, cfg):
    """(batch, key) -> the DiT's low-res inputs: {} for a text-to-video DiT; for an SR stage the batch's
    `lowres_tokens` noise-augmented per clip to a level in [0, sr.max_aug], and that level (cascade.py)."""
    if not models.dit.lowres_dim:
        return lambda batch, key: {}

    def augmented(batch, key):
        lowres, aug = cascade.augment_per_segment(key, batch["lowres_tokens"], batch["segment_ids"],
                                                  max_segments=cfg.max_segments, max_aug=float(cfg.sr.max_aug))
        return {"lowres_BxSxQ": lowres, "aug_BxS": aug}
    return augmented


def dit_loss_fn(models: Models, cfg, empty_states=None):
    d = cfg.diffusion
    text_fn = text_conditioning(models, cfg, empty_states)
    lowres_fn = lowres_conditioning(models, cfg)

    def loss_fn(params, batch, rng):
        k_drop, k_t, k_eps = jax.random.split(rng, 3)
        text_states, text_segment_ids = text_fn(params, batch, k_drop)
        x0, segment_ids, cond_mask = batch["tokens"], batch["segment_ids"], batch["cond_mask"]
        t = diffusion.per_token_timesteps(k_t, segment_ids, cond_mask, max_segments=cfg.max_segments,
                                          base_tokens=d.base_tokens, mean=d.t_mean, std=d.t_std,
                                          high_noise_rate=d.get("high_noise_rate", 0.0),
                                          high_noise_min=d.get("high_noise_min", 0.9))
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = jnp.where(cond_mask[..., None], x0, diffusion.flow_interpolate(x0, eps, t))
        # A key of its own (folded, not split): the text-to-video DiT's draws stay what they always were.
        v = models.dit.apply({"params": params["dit"]}, x_t, batch["coords"], segment_ids, t, text_states,
                             text_segment_ids, **lowres_fn(batch, jax.random.fold_in(rng, 1)))
        return diffusion.masked_mse(v, diffusion.flow_velocity_target(x0, eps), segment_ids, cond_mask), {}
    return loss_fn


def vae_loss_fn(vae: VideoVAE, kl_weight: float):
    def loss_fn(params, batch, rng):
        recon, mean, logvar = vae.apply({"params": params}, batch["video"], rng)
        loss, metrics = vae_loss(batch["video"], recon, mean, logvar, kl_weight=kl_weight)
        metrics.pop("loss")
        return loss, metrics
    return loss_fn


# ------------------------------------------------------------------------------------------- tasks


def caches_text(cfg) -> bool:
    """Whether batches carry the frozen text encoder's states (model.text_cache) instead of running it."""
    return cfg.model.get("text_encoder", "bytes") != "bytes" and cfg.model.get("text_cache", False)


def _abstract_dit_batch(cfg, rows: int, models: Models | None = None) -> dict:
    models = build(cfg) if models is None else models
    s, l, p = cfg.seq_len, cfg.text_len, models.dit.patch_dim
    batch = {"tokens": jnp.zeros((rows, s, p), jnp.float32), "coords": jnp.zeros((rows, s, 3), jnp.int32),
             "segment_ids": jnp.ones((rows, s), jnp.int32), "cond_mask": jnp.zeros((rows, s), bool),
             "text_tokens": jnp.ones((rows, l), jnp.int32), "text_segment_ids": jnp.ones((rows, l), jnp.int32)}
    if caches_text(cfg):
        batch["text_states"] = jnp.zeros((rows, l, models.text.width), jnp.float32)
    if models.dit.lowres_dim:
        batch["lowres_tokens"] = jnp.zeros((rows, s, models.dit.lowres_dim), jnp.float32)
    return batch


def dit_task(cfg, vae_params=None, latent_stats=((0.0,), (1.0,)), make_batches=pipeline.dit_batches) -> Task:
    mean, std = latent_stats
    models = build(cfg, latent_mean=mean, latent_std=std)
    text, cached = models.text, caches_text(cfg)

    def text_abstract():
        batch = _abstract_dit_batch(cfg, 1, models)
        return jax.eval_shape(text.module.init, jax.random.PRNGKey(0), batch["text_tokens"],
                              batch["text_segment_ids"])["params"]

    def init_params(key):
        k_text, k_dit = jax.random.split(key)
        batch = _abstract_dit_batch(cfg, 1, models)
        text_states = jnp.zeros((1, cfg.text_len, text.width), jnp.float32)
        lowres = {}
        if models.dit.lowres_dim:
            lowres = dict(lowres_BxSxQ=batch["lowres_tokens"], aug_BxS=jnp.zeros((1, cfg.seq_len)))
        dit_vars = models.dit.init(k_dit, batch["tokens"], batch["coords"], batch["segment_ids"],
                                   jnp.zeros((1, cfg.seq_len)), text_states, batch["text_segment_ids"], **lowres)
        if text.frozen:
            return {"dit": dit_vars["params"]}
        text_vars = text.module.init(k_text, batch["text_tokens"], batch["text_segment_ids"])
        return {"dit": dit_vars["params"], "text": text_vars["params"]}

    # A cached encoder's params live in the pipeline (host memory), not the step; one run in the step is
    # placed in its shardings like the DiT's.
    frozen_in_step = text.frozen and not cached
    empty_states = None
    host_text_params = None
    if cached and text.pretrained.params is None:
        # An encoder's shape alone (model.text_encoder_shape): enough to describe and compile the step, whose
        # dropout needs only the empty caption's shape; `batches` refuses to run without the weights.
        empty_states = np.zeros((1, text.width), np.float32)
    elif cached:
        host_text_params = frozen_params(text)
        empty_states = empty_caption_states(text, host_text_params)

    def batches(process_index, process_count):
        # Each host encodes its own clips in a prefetch thread, so with a VAE copy on one local device:
        # a computation over the global mesh would have to be launched by every process in step.
        if cached and host_text_params is None:
            frozen_params(text)  # raises: the encoder is a shape without weights
        local_params = jax.device_put(distributed.host_copy(vae_params), jax.local_devices()[0])
        return make_batches(cfg, lambda video: np.asarray(encode_mean(models.vae, local_params, video[None]))[0],
                            process_index=process_index, process_count=process_count, tokenizer=text.tokenizer,
                            encode_text=CaptionStates(text, host_text_params) if cached else None)

    video = jax.sharding.PartitionSpec(("data", "fsdp"), "context")
    text_spec = jax.sharding.PartitionSpec(("data", "fsdp"))
    specs = {"tokens": video, "coords": video, "segment_ids": video, "cond_mask": video,
             "text_tokens": text_spec, "text_segment_ids": text_spec}
    if cached:
        specs["text_states"] = text_spec

    def token_counts(batch):
        stats = packing.packing_stats(batch["segment_ids"])
        return stats["real_tokens"], stats["slots"]

    return Task("dit", init_params, dit_loss_fn(models, cfg, empty_states), batches, specs, token_counts,
                cfg.total_steps, cfg.learning_rate,
                frozen_abstract=(lambda: {"text": text_abstract()}) if frozen_in_step else dict,
                load_frozen=(lambda shardings: {"text": frozen_params(text, shardings["text"])})
                if frozen_in_step else None)


def sr_task(cfg, vae_params=None, latent_stats=((0.0,), (1.0,))) -> Task:
    """A super-resolution stage: the DiT task (same step, text path and packing) whose DiT also sees each
    clip's low-res latent, encoded by the same frozen VAE from the crop downscaled by sr.spatial_factor (and
    sr.temporal_factor) and upsampled back onto the clip's patch grid (pipeline.sr_batches), noise-augmented
    in the step (lowres_conditioning)."""
    task = dit_task(cfg, vae_params, latent_stats, make_batches=pipeline.sr_batches)
    specs = {**task.batch_specs, "lowres_tokens": task.batch_specs["tokens"]}
    return dataclasses.replace(task, name="sr", batch_specs=specs)


def vae_task(cfg) -> Task:
    vae = build_vae(cfg.vae)
    crop = tuple(int(c) for c in cfg.vae.crop)

    def init_params(key):
        return vae.init(key, jnp.zeros((1, *crop, 3), jnp.float32))["params"]

    def token_counts(batch):
        n = int(np.prod(batch["video"].shape[:-1]))  # pixels: a dense batch has no padding
        return n, n

    return Task("vae", init_params, vae_loss_fn(vae, cfg.vae.kl_weight),
                lambda i, n: pipeline.vae_batches(cfg, process_index=i, process_count=n),
                {"video": jax.sharding.PartitionSpec(("data", "fsdp"))}, token_counts,
                cfg.vae.train_steps, cfg.vae.learning_rate)


# -------------------------------------------------------------------------------------------- loop


def create_state(cfg, task: Task, mesh):
    """(init fn, state shardings, abstract state) - `eval_shape` first, so nothing is allocated until the
    init runs, and then each device allocates only its own shards (and reads only its shards of frozen
    pretrained params)."""
    tx, _ = make_optimizer(cfg, task.learning_rate, task.total_steps)

    def init_boxed(key):
        params = task.init_params(key)
        return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), task.frozen_abstract())

    boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    with sharding.rules_context(mesh):
        shardings = sharding.logical_sharding(boxed, mesh)
    abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      nn.meta.unbox(boxed), shardings)
    init_trained = jax.jit(lambda key: nn.meta.unbox(init_boxed(key)).replace(frozen={}),
                           out_shardings=shardings.replace(frozen={}))

    def init(key):
        return attach_frozen(init_trained(key), task, abstract)
    return init, shardings, abstract


def attach_frozen(state: TrainState, task: Task, abstract: TrainState) -> TrainState:
    """`state` with the task's frozen params read from their folder into the shardings `abstract` gives."""
    if task.load_frozen is None:
        return state
    return state.replace(frozen=task.load_frozen(jax.tree_util.tree_map(lambda a: a.sharding, abstract.frozen)))


def start_from_weights(cfg, state: TrainState, abstract: TrainState) -> TrainState:
    """A fresh state whose DiT params and EMA are config.init_from's Wan transformer (validated to be the
    DiT model.* describes), each device reading only its own shards; a resumed run never comes here."""
    from soraax.wan.dit_weights import load_wan_transformer
    from soraax.wan.folder import TRANSFORMER
    wan = load_wan_transformer(os.path.join(cfg.init_from, TRANSFORMER), scan_layers=cfg.model.scan_layers)
    target = abstract.params["dit"]
    weights.check_tree(wan.params, target, f"config.init_from={cfg.init_from}")
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, target)
    # Two placements, not one shared: the step donates the state, and params and EMA must not alias.
    dit, ema = weights.place(wan.params, shardings), weights.place(wan.params, shardings)
    return state.replace(params={**state.params, "dit": dit}, ema_params={**state.ema_params, "dit": ema})


def sharded_step(cfg, task: Task, mesh):
    """(init, step, abstract state): the init and the train step jitted once with explicit shardings on
    `mesh` (state sharded by the logical rules, batch by `task.batch_specs`), the state donated."""
    tx, schedule = make_optimizer(cfg, task.learning_rate, task.total_steps)
    init, state_shardings, abstract = create_state(cfg, task, mesh)
    batch_shardings = {k: jax.sharding.NamedSharding(mesh, s) for k, s in task.batch_specs.items()}
    replicated = sharding.replicated(mesh)
    step = jax.jit(make_train_step(task.loss_fn, tx, schedule, cfg.ema_decay),
                   in_shardings=(state_shardings, batch_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
    return init, step, abstract


def _param_count(abstract_state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_state.params))


def _global_batch(batch: dict, specs: dict, mesh) -> dict:
    return {k: jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, specs[k]), np.asarray(v))
            for k, v in batch.items()}


class MetricsWriter:
    """Appends one JSON object a line to WORKDIR/metrics.jsonl (process 0 only)."""

    def __init__(self, workdir: str, name: str):
        self.path = os.path.join(workdir, f"metrics_{name}.jsonl" if name != "dit" else "metrics.jsonl")

    def write(self, record: dict):
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> None:
        """Drops the records after `step`: a run killed after its last checkpoint logged steps that the
        resumed run logs again, and the file should read as one uninterrupted run."""
        if jax.process_index() != 0 or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                continue
        if len(kept) != len(lines):
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)


def _log_record(step: int, metrics: dict, window: dict, elapsed: float) -> dict:
    return {"step": step, **{k: float(v) for k, v in metrics.items()},
            "real_tokens_per_sec": window["real"] / elapsed, "padded_tokens_per_sec": window["slots"] / elapsed,
            "packing_efficiency": window["real"] / max(window["slots"], 1), "step_time": elapsed / window["steps"]}


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def train(cfg, workdir: str, task: Task, *, show_progress: bool = True, stop_at: int | None = None,
          watch: preemption.PreemptionWatch | None = None, fresh_data_at: int | None = None) -> list[dict]:
    """Runs (or resumes) `task` to its total steps in `workdir`; returns the logged metric records.

    `stop_at` ends this run early at that step with a checkpoint; the next call resumes from it and
    continues the same schedule and batch sequence. On SIGTERM (or `watch.request()`) the run saves at the
    next step boundary and raises `Preempted`. A step with a non-finite loss or gradient changes nothing
    and is counted (`skipped_updates`); `max_nonfinite_steps` of them in a row raise `NonFiniteError`,
    and no checkpoint ever holds non-finite params. Resumed from step `fresh_data_at`, the data starts at
    its beginning: that checkpoint's iterator is another pipeline's (the curriculum's, soraax/curriculum.py).
    """
    os.makedirs(workdir, exist_ok=True)
    checkpoints.write_config(workdir, cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    init, step_fn, abstract = sharded_step(cfg, task, mesh)

    data = iter(task.batches(jax.process_index(), jax.process_count()))
    mngr = checkpoints.manager(workdir, keep=cfg.keep_checkpoints, every=cfg.checkpoint_every)
    writer = MetricsWriter(workdir, task.name)
    if mngr.latest_step() is not None:
        with_data = data if mngr.latest_step() != fresh_data_at else None
        state = attach_frozen(checkpoints.restore(mngr, abstract, with_data), task, abstract)
        message = f"[{task.name}] resuming from step {int(state.step)} in {workdir}"
        writer.keep_until(int(state.step))
    else:
        state = init(jax.random.PRNGKey(cfg.seed))
        message = (f"[{task.name}] starting: {_param_count(abstract):,} params, mesh {dict(mesh.shape)}, "
                   f"{task.total_steps} steps")
        if cfg.get("init_from", "") and task.name == "dit":
            state = start_from_weights(cfg, state, abstract)
            message += f", DiT from {cfg.init_from}"
    if jax.process_index() == 0:
        print(message, flush=True)
    rng = jax.random.PRNGKey(cfg.seed + 1)
    records, window = [], {"real": 0, "slots": 0, "steps": 0}
    start = int(state.step)
    progress = tqdm(total=task.total_steps, initial=start, desc=f"train {task.name}", unit="step",
                    disable=not show_progress or jax.process_index() != 0, dynamic_ncols=True)
    patience = int(cfg.get("max_nonfinite_steps", 20))
    data_start = pipeline.skip_summary()  # counts are per process: this run's start
    previous_streak, last_saved, preempted = None, start, False
    end = task.total_steps if stop_at is None else min(stop_at, task.total_steps)
    tick = time.perf_counter()
    try:
        with sharding.rules_context(mesh), (watch or preemption.PreemptionWatch()) as watch:
            for step in range(start, end):
                host_batch = next(data)
                real, slots = task.token_counts(host_batch)
                batch = _global_batch(host_batch, task.batch_specs, mesh)
                if step == start and jax.process_count() > 1:
                    # Each host's pipeline compiles its own clip shapes, so processes reach the first step far
                    # apart, and gloo (CPU) fails a first collective whose processes arrive 30 s apart:
                    # compile (the call below reuses it), then meet.
                    step_fn.lower(state, batch, rng).compile()
                    distributed.meet(f"{task.name}: first step {step}")
                state, metrics = step_fn(state, batch, rng)
                # The previous step's streak, read while this step runs (no stall): a run stops at most one
                # step after its patience is spent, its updates skipped all along.
                if previous_streak is not None and int(previous_streak) >= patience:
                    raise NonFiniteError(
                        f"[{task.name}] step {step}: the loss or gradients were non-finite for "
                        f"{int(previous_streak)} steps in a row (their updates were skipped); stopping. The last "
                        f"checkpoint (step {last_saved}) holds finite params: lower learning_rate, check the "
                        f"data, or raise max_nonfinite_steps")
                previous_streak = metrics["nonfinite_streak"]
                window["real"] += real * jax.process_count()
                window["slots"] += slots * jax.process_count()
                window["steps"] += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == task.total_steps:
                    metrics = jax.device_get(metrics)  # waits for this step; the window's time is then honest
                    now = time.perf_counter()
                    record = _log_record(done, metrics, window, now - tick)
                    record.update({f"data_{k}": v for k, v in pipeline.skip_summary(since=data_start).items()})
                    tick, window = now, {"real": 0, "slots": 0, "steps": 0}
                    records.append(record)
                    writer.write(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['real_tokens_per_sec']:.0f}")
                preempted = watch.should_stop(done)
                if done % cfg.checkpoint_every == 0 or done == end or preempted:
                    if not bool(_all_finite(state.params)):
                        raise NonFiniteError(f"[{task.name}] step {done}: the params are not finite; not saving "
                                             f"them over the last checkpoint (step {last_saved})")
                    checkpoints.save(mngr, done, state, data, force=True)
                    last_saved = done
                progress.update(1)
                if preempted:
                    break
    finally:
        progress.close()
        if hasattr(data, "close"):
            data.close()  # stop prefetch threads and worker processes now, not at interpreter exit
        mngr.wait_until_finished()  # a save in flight completes: the last checkpoint is whole
        mngr.close()
    if jax.process_index() == 0:
        print(f"[{task.name}] data: {pipeline.format_skip_summary(pipeline.skip_summary(since=data_start))}",
              flush=True)
    if preempted:
        raise Preempted(last_saved, workdir, watch.signal_name)
    return records


# ----------------------------------------------------------------------------------------- the VAE


def vae_latent_stats(cfg, vae_dir: str, num_batches: int = 8):
    """Per-channel mean/std of the trained VAE's latents on training data, cached in vae_dir."""
    path = os.path.join(vae_dir, LATENT_STATS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stats = json.load(f)
        return tuple(stats["mean"]), tuple(stats["std"])
    # On one local device: a process that finds the file another has just written skips these encodes.
    params = jax.device_put(distributed.host_copy(load_vae_params(cfg, vae_dir)), jax.local_devices()[0])
    vae = build_vae(cfg.vae)
    data = iter(pipeline.vae_batches(cfg))
    mean, std = latent_channel_stats(np.asarray(encode_mean(vae, params, next(data)["video"]))
                                     for _ in range(num_batches))
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:  # then renamed, so no process reads it half-written
            json.dump({"mean": mean, "std": std}, f)
        os.replace(path + ".tmp", path)
    return mean, std


def load_vae_params(cfg, vae_dir: str, use_ema: bool = True):
    """The VAE params (EMA by default) of a finished VAE run in `vae_dir`."""
    task = vae_task(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    _, _, abstract = create_state(cfg, task, mesh)
    mngr = checkpoints.manager(vae_dir, keep=cfg.keep_checkpoints, every=cfg.checkpoint_every)
    if mngr.latest_step() is None:
        raise FileNotFoundError(f"no VAE checkpoint in {vae_dir}: train one with "
                                f"python -m soraax.train --config configs/vae_tiny.py --workdir {vae_dir}")
    field = "ema_params" if use_ema else "params"
    weights = checkpoints.restore_weights(mngr, abstract, fields=(field,))
    mngr.close()
    return weights[field]


def ensure_vae(cfg, workdir: str) -> str:
    """The folder of the VAE this DiT config uses, training it first if the config names none."""
    if cfg.vae.checkpoint:
        if not os.path.isdir(cfg.vae.checkpoint):
            raise FileNotFoundError(f"config.vae.checkpoint={cfg.vae.checkpoint!r} is not a folder")
        return cfg.vae.checkpoint
    vae_dir = os.path.join(workdir, "vae")
    vae_cfg = cfg.copy_and_resolve_references()
    vae_cfg.task = "vae"
    train(vae_cfg, vae_dir, vae_task(vae_cfg))
    return vae_dir


def run(cfg, workdir: str) -> list[dict]:
    config_lib.validate(cfg, num_devices=jax.device_count())
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise config_lib.ConfigError(f"--workdir {workdir} is a file, not a folder")
    if cfg.task == "vae":
        return train(cfg, workdir, vae_task(cfg))
    from soraax.wan.folder import wan_vae_path
    if cfg.task == "dit" and wan_vae_path(cfg):
        # Wan's own VAE (models.build uses its module, which carries its latent statistics): nothing to train.
        from soraax.wan.vae_weights import load_wan_vae
        vae_params = weights.materialise(load_wan_vae(wan_vae_path(cfg)).params)
        return train(cfg, workdir, dit_task(cfg, vae_params))
    vae_dir = ensure_vae(cfg, workdir)  # an SR config names its base's VAE (validated), so never trains one
    stats = vae_latent_stats(cfg, vae_dir)
    make_task = sr_task if cfg.task == "sr" else dit_task
    vae_params = load_vae_params(cfg, vae_dir)
    warm = curriculum.steps(cfg)  # validated: below total_steps, on the synthetic source
    records = []
    if warm and (checkpoints.latest_step(workdir) or 0) < warm:
        stage = curriculum.stage_config(cfg)
        if jax.process_index() == 0:
            print(f"[dit] curriculum: steps 1-{warm} on {curriculum.describe(cfg)}", flush=True)
        records = train(stage, workdir, make_task(stage, vae_params, stats), stop_at=warm)
    return records + train(cfg, workdir, make_task(cfg, vae_params, stats), fresh_data_at=warm or None)


# -------------------------------------------------------------------------------------------- CLI


def _abstract_batch(cfg) -> dict:
    if cfg.task in ("dit", "sr"):
        return jax.eval_shape(lambda: _abstract_dit_batch(cfg, cfg.batch_size))
    return {"video": jax.ShapeDtypeStruct((cfg.vae.batch_size, *cfg.vae.crop, 3), jnp.float32)}


def lower_step(cfg, mesh):
    """(lowered train step, abstract state, tokens per step): the step `train` runs, lowered for `mesh` on
    shapes alone. The mesh's devices may be compile-only (a TPU topology, see soraax/topology.py)."""
    task = {"dit": dit_task, "sr": sr_task, "vae": vae_task}[cfg.task](cfg)
    _, step_fn, abstract = sharded_step(cfg, task, mesh)
    batch = _abstract_batch(cfg)
    if cfg.task in ("dit", "sr"):
        tokens = cfg.batch_size * cfg.seq_len
    else:  # pixels: a VAE batch is dense
        tokens = int(np.prod(batch["video"].shape[:-1]))
    with sharding.rules_context(mesh):
        lowered = step_fn.lower(abstract, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
    return lowered, abstract, tokens


def describe(cfg, *, compile_step: bool) -> dict:
    """Param count, FLOPs per token, batch and mesh of the step, from shapes alone (nothing allocated);
    with `compile_step` also XLA's compiled memory use."""
    config_lib.validate(cfg, num_devices=jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    lowered, abstract, tokens = lower_step(cfg, mesh)
    batch = _abstract_batch(cfg)
    info = {"task": cfg.task, "params": _param_count(abstract), "mesh": dict(mesh.shape),
            "batch": {k: list(v.shape) for k, v in batch.items()}, "tokens_per_step": tokens}
    if cfg.task in ("dit", "sr"):
        info.update(flops.dit_train_flops(cfg, abstract.params, abstract.frozen))
    else:  # no scanned stack: XLA's own count is whole
        info["flops_per_step"] = float((lowered.cost_analysis() or {}).get("flops", float("nan")))
        info["flops_per_token"] = info["flops_per_step"] / tokens
    if compile_step:
        memory = lowered.compile().memory_analysis()
        if memory is not None:
            info["memory_bytes"] = {k: int(getattr(memory, k)) for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes") if hasattr(memory, k)}
    return info


_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file with get_config()", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the config go; a rerun resumes")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print param count, FLOPs per token, batch and mesh; allocate nothing")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "lower and compile the train step and print its memory use")
_TOPOLOGY = flags.DEFINE_string("topology", None, "with --compile_only: compile for this TPU slice (v5p-64, v5e-16, "
                                "v6e-64, ...) from this CPU machine with libtpu; print per-chip memory and fit")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of process 0 "
                                   "(default $SORAAX_COORDINATOR_ADDRESS; see soraax/distributed.py)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "multi-host: processes in the run (default $SORAAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process, 0..N-1 (default $SORAAX_PROCESS_ID)")


def main(argv):
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
    # Each clip shape compiles its own VAE encode; a persistent cache makes reruns start at once.
    if not jax.config.jax_compilation_cache_dir:  # $JAX_COMPILATION_CACHE_DIR, when set, wins
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/soraax/jax"))
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    describe_only = _DRY_RUN.value or _COMPILE_ONLY.value
    if not describe_only and not _WORKDIR.value:
        raise app.UsageError("--workdir is required to train, e.g. --workdir runs/tiny")
    if _TOPOLOGY.value:
        if not _COMPILE_ONLY.value:
            raise app.UsageError("--topology compiles for a TPU slice: use it with --compile_only, e.g. "
                                 "--compile_only --topology v5p-64")
        # The slice's devices are compile-only and come from libtpu; the host backend must not look for a TPU.
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
        try:
            print(json.dumps(topology.compile_report(cfg, _TOPOLOGY.value, lower_step), indent=2))
        except (config_lib.ConfigError, topology.TopologyError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        return
    try:
        # Before anything touches a device: the global device list is fixed when the backend starts.
        setup = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except distributed.DistributedConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if setup.process_count > 1 and setup.process_index == 0:
        print(f"distributed: {setup}", flush=True)
    with distributed.fail_fast(setup):
        try:
            if describe_only:
                info = describe(cfg, compile_step=_COMPILE_ONLY.value)
                if setup.process_index == 0:
                    print(json.dumps(info, indent=2))
                return
            run(cfg, _WORKDIR.value)
        except Preempted as stop:  # a clean stop: the scheduler may restart the same command
            if setup.process_index == 0:
                print(stop, flush=True)
            return
        except (config_lib.ConfigError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except NonFiniteError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
