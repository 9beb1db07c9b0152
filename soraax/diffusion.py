"""Noise schedules, training targets and losses, samplers and classifier-free guidance, on packed rows.

One time convention everywhere: t in [0, 1], t = 0 is clean data and t = 1 is pure noise; samplers
integrate from t = 1 down to t = 0.
  * Rectified flow (the default, SD3 / Movie Gen): `x_t = (1 - t) x0 + t eps`, and the network predicts
    the velocity `v = eps - x0 = dx_t/dt`. Training draws t logit-normal, one per segment, shifted towards
    noise for segments with more tokens (`resolution_shift`).
  * DDPM-style (variance preserving): `x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps`, with `abar` from a
    discrete linear or cosine beta schedule read at continuous t; eps-, v- and x0-prediction; DDIM sampling.

Everything is per token: `t` has one entry per token, so one packed row can hold clips at different noise
levels, and conditioning tokens (`cond_mask`: the first frame for image->video, past frames for
extension) sit at t = 0, take no loss, and are held at their clean values by the samplers.

Dimension key: B batch rows, S packed tokens, P patch dim, M max_segments + 1 (segment id 0 = padding).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from soraax.packing import segment_token_counts

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
PREDICTIONS = ("eps", "v", "x0")


def _expand(a, x):
    """Appends trailing unit axes so `a` ([B, S], [B] or scalar) broadcasts against `x` ([B, S, P])."""
    a = jnp.asarray(a)
    if a.ndim > x.ndim or any(d not in (1, n) for d, n in zip(a.shape, x.shape)):
        raise ValueError(f"shape {a.shape} does not lead shape {x.shape}; expected a prefix of it")
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


# ----------------------------------------------------------------------------------------------------
# Rectified flow: timesteps, interpolation, targets.


def logit_normal(key, shape, mean: float = 0.0, std: float = 1.0):
    """t = sigmoid(N(mean, std^2)) in (0, 1): SD3's choice, it spends training on the middle of the path."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def shift_time(t, alpha):
    """t' = alpha t / (1 + (alpha - 1) t): the time reparametrisation of SD3 (Esser et al. 2024, eq. 23).

    Fixes 0 and 1, is increasing in t, and for alpha > 1 moves every t towards noise.
    """
    return alpha * t / (1.0 + (alpha - 1.0) * t)


def _resolution_alpha(num_tokens, base_tokens: float):
    # A segment id with no tokens (padding column, unused slot) counts as one token so its shift stays
    # finite; nothing reads its t.
    return jnp.sqrt(jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0) / base_tokens)


def resolution_shift(t, num_tokens, base_tokens: float):
    """Shifts t by alpha = sqrt(num_tokens / base_tokens): more tokens carry more redundant signal, so a
    bigger clip needs more noise to be equally corrupted (SD3 sec. 5.3.2). Identity at base_tokens.

    `num_tokens` broadcasts against `t` (same rank, or a scalar).
    """
    return shift_time(t, _resolution_alpha(num_tokens, base_tokens))


def token_shift(segment_ids_BxS, *, max_segments: int, base_tokens: float):
    """float32 [B, S]: each token's resolution-shift alpha, from its segment's token count.

    Pass as `sample_flow(..., shift=...)` so sampling uses the time grid each clip was trained on.
    """
    counts_BxM = segment_token_counts(segment_ids_BxS, max_segments)
    alpha_BxM = _resolution_alpha(counts_BxM, base_tokens)
    return jnp.take_along_axis(alpha_BxM, segment_ids_BxS, axis=1)


def high_noise_mixture(key, t, rate: float, low: float):
    """t with a share `rate` of its entries redrawn uniform in [low, 1).

    A caption's layout (where the object is, which way it goes) is decided in the first sampling steps,
    near t = 1; the logit-normal gives that range a few percent of training, too little for a small model
    to learn a layout word (docs/train.md). rate = 0 returns t unchanged.
    """
    if not rate:
        return t
    k_pick, k_t = jax.random.split(key)
    high = jax.random.uniform(k_t, t.shape, jnp.float32, low, 1.0)
    return jnp.where(jax.random.bernoulli(k_pick, rate, t.shape), high, t)


def per_token_timesteps(key, segment_ids_BxS, cond_mask_BxS, *, max_segments: int, base_tokens: float,
                        mean: float = 0.0, std: float = 1.0, high_noise_rate: float = 0.0,
                        high_noise_min: float = 0.9):
    """float32 [B, S]: one logit-normal t per segment, shifted by that segment's size, gathered per token;
    with high_noise_rate > 0 that share of segments instead draws t uniform in [high_noise_min, 1).

    Padding and conditioning tokens get t = 0. Segment ids must lie in [0, max_segments]; a larger id
    gathers out of range and its tokens read NaN (jit cannot raise on data).
    """
    b = segment_ids_BxS.shape[0]
    # Without the mixture the key is used as it always was, so existing runs draw the same t.
    k_t, k_high = jax.random.split(key) if high_noise_rate else (key, None)
    t_BxM = logit_normal(k_t, (b, max_segments + 1), mean, std)
    t_BxM = resolution_shift(t_BxM, segment_token_counts(segment_ids_BxS, max_segments), base_tokens)
    t_BxM = high_noise_mixture(k_high, t_BxM, high_noise_rate, high_noise_min)
    t_BxS = jnp.take_along_axis(t_BxM, segment_ids_BxS, axis=1, mode="fill", fill_value=jnp.nan)
    return jnp.where(loss_weights(segment_ids_BxS, cond_mask_BxS) > 0, t_BxS, 0.0)


def flow_interpolate(x0, eps, t):
    """x_t = (1 - t) x0 + t eps, with t per token ([B, S]) or per row ([B])."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * eps


def flow_velocity_target(x0, eps):
    """v = eps - x0 = d x_t / dt: what the network learns to predict under rectified flow."""
    return eps - x0


def flow_x0_eps(x_t, v, t):
    """(x0, eps) implied by a velocity prediction at x_t: the exact inverse of interpolate + target."""
    t = _expand(t, x_t)
    return x_t - t * v, x_t + (1.0 - t) * v


# ----------------------------------------------------------------------------------------------------
# Losses.


def loss_weights(segment_ids_BxS, cond_mask_BxS):
    """float32 [B, S]: 1 on tokens that take loss (real and not conditioning), else 0."""
    return ((segment_ids_BxS > 0) & ~cond_mask_BxS.astype(bool)).astype(jnp.float32)


def masked_mse(pred_BxSxP, target_BxSxP, segment_ids_BxS, cond_mask_BxS):
    """Mean over loss-taking tokens of each token's mean squared error; 0 when no token takes loss.

    Every real token weighs the same, so a packed row's loss is the token-weighted mean of its clips'.
    """
    w_BxS = loss_weights(segment_ids_BxS, cond_mask_BxS)
    # `where` before squaring, not a product after: a padding token's prediction may be anything, inf
    # included, and neither its value nor its gradient may reach the loss.
    diff_BxSxP = jnp.where(w_BxS[..., None] > 0,
                           pred_BxSxP.astype(jnp.float32) - target_BxSxP.astype(jnp.float32), 0.0)
    per_token_BxS = jnp.square(diff_BxSxP).mean(axis=-1)
    return per_token_BxS.sum() / jnp.maximum(w_BxS.sum(), 1.0)


# ----------------------------------------------------------------------------------------------------
# DDPM-style (variance-preserving) schedules.


class DDPMSchedule(NamedTuple):
    """A discrete beta schedule of T steps, read at continuous t in [0, 1] (step i sits at t = i / T).

    A NamedTuple of arrays, so it passes through `jit` as a pytree. Between steps, log abar is linear in t
    (a constant beta within a step); abar(0) = 1.
    """
    betas: jax.Array  # [T]

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        """Ho et al. 2020's schedule (their values at T = 1000)."""
        return cls(jnp.linspace(beta_start, beta_end, num_steps, dtype=jnp.float32))

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal 2021: abar(t) = cos^2((t + s) / (1 + s) pi / 2) / abar(0), betas clipped at
        max_beta so the last step stays finite."""
        t = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32)
        f = jnp.cos((t + s) / (1.0 + s) * jnp.pi / 2) ** 2
        return cls(jnp.minimum(1.0 - f[1:] / f[:-1], max_beta))

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_bar(self):
        """[T]: abar after steps 1..T."""
        return jnp.cumprod(1.0 - self.betas)

    def alpha_bar(self, t):
        """abar at continuous t (any shape), 1 at t = 0 and alphas_bar[-1] at t = 1."""
        log_abar = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(jnp.log1p(-self.betas))])
        steps = jnp.arange(self.num_steps + 1, dtype=jnp.float32)
        t = jnp.asarray(t, jnp.float32)
        return jnp.exp(jnp.interp(t * self.num_steps, steps, log_abar).reshape(t.shape))

    def alpha_sigma(self, t):
        """(sqrt(abar), sqrt(1 - abar)): the weights of x0 and eps in x_t."""
        abar = self.alpha_bar(t)
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    def q_sample(self, x0, eps, t):
        """x_t = alpha(t) x0 + sigma(t) eps, t per token ([B, S]) or per row ([B])."""
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * eps

    def target(self, x0, eps, t, prediction: str):
        """The training target for `prediction` in {"eps", "v", "x0"}; v = alpha eps - sigma x0
        (Salimans & Ho 2022)."""
        _check_prediction(prediction)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * eps - _expand(sigma, x0) * x0

    def to_x0_eps(self, x_t, t, model_out, prediction: str):
        """(x0, eps) implied by a network output of kind `prediction` at (x_t, t).

        eps-prediction divides by alpha, which is tiny near t = 1; v-prediction stays exact there.
        """
        _check_prediction(prediction)
        alpha, sigma = self.alpha_sigma(t)
        alpha, sigma = _expand(alpha, x_t), _expand(sigma, x_t)
        if prediction == "eps":
            return (x_t - sigma * model_out) / alpha, model_out
        if prediction == "x0":
            # At t = 0 (conditioning tokens) sigma = 0 and eps is undefined; any finite value serves.
            return model_out, (x_t - alpha * model_out) / jnp.where(sigma > 0, sigma, 1.0)
        return alpha * x_t - sigma * model_out, sigma * x_t + alpha * model_out


def _check_prediction(prediction: str):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction {prediction!r} is not one of {PREDICTIONS}")


def ddim_step(schedule: DDPMSchedule, x0, eps, t, t_next, *, eta=0.0, key=None):
    """x at t_next from the (x0, eps) predicted at t (Song et al. 2021, eq. 12).

    eta = 0 is the deterministic DDIM; eta = 1 is ancestral DDPM sampling and needs `key`.
    """
    abar, abar_next = _expand(schedule.alpha_bar(t), x0), _expand(schedule.alpha_bar(t_next), x0)
    # Conditioning tokens sit at abar = abar_next = 1, where the ratio is 0/0; they take no noise.
    ratio = (1.0 - abar_next) / jnp.where(abar < 1.0, 1.0 - abar, 1.0)
    sigma_eta = eta * jnp.sqrt(ratio * jnp.maximum(1.0 - abar / abar_next, 0.0))
    x_next = jnp.sqrt(abar_next) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_next - sigma_eta**2, 0.0)) * eps
    if key is None:
        return x_next
    return x_next + sigma_eta * jax.random.normal(key, x0.shape, x0.dtype)


# ----------------------------------------------------------------------------------------------------
# Samplers. Each is one `fori_loop`, so a whole sampler jits to one program whatever num_steps is.


def _unshifted_grid(num_steps: int, strength):
    return strength * (1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps)


def flow_timesteps(num_steps: int, shift=1.0, strength=1.0):
    """float32 [num_steps + 1]: t from shift_time(strength) down to 0, evenly spaced before the shift.

    With shift = the training alpha of a clip's size, sampling visits the noise levels training did.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(_unshifted_grid(num_steps, strength), shift)


def _holder(x_cond, cond_mask, x):
    """A function resetting conditioning tokens to x_cond, and the t mask they take."""
    if (x_cond is None) != (cond_mask is None):
        raise ValueError("x_cond and cond_mask come together: pass both or neither")
    if cond_mask is None:
        return (lambda x: x), None
    if x_cond.shape != x.shape or cond_mask.shape != x.shape[:-1]:
        raise ValueError(f"x_cond {x_cond.shape} must match noise {x.shape} and cond_mask {cond_mask.shape} "
                         f"must be {x.shape[:-1]}")
    cond_mask = cond_mask.astype(bool)
    return (lambda x: jnp.where(cond_mask[..., None], x_cond.astype(x.dtype), x)), cond_mask


def sample_flow(velocity_fn: VelocityFn, noise, *, num_steps: int, method: str = "euler", shift=1.0,
                strength=1.0, x_init=None, x_cond=None, cond_mask=None):
    """Integrates dx/dt = velocity_fn(x, t) from t = shift_time(strength) to t = 0; returns x at t = 0.

    noise: [B, S, P]; velocity_fn(x [B, S, P], t [B, S]) -> v [B, S, P].
    shift: a scalar alpha, or per-token alphas [B, S] (`token_shift`) so each packed clip follows its own
      training grid.
    strength < 1 with x_init (SDEdit): start from x_init noised to t = shift_time(strength), i.e. the
      last `strength` fraction of the schedule, as img2img pipelines count it. A scalar, or per token
      [B, S] so packed clips edit at their own strengths; where it is 1 the start is `noise` exactly.
    x_cond, cond_mask: tokens under cond_mask are held at x_cond, shown to the network at t = 0.
    method: "euler" (num_steps evaluations) or "heun" (second order; the last step, into t = 0, is an
      Euler step as in EDM (Karras et al. 2022), where the velocity of a sharp data distribution is
      singular; its unused second evaluation still runs, to keep one loop body).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method {method!r} is not 'euler' or 'heun'")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if x_init is None and not (isinstance(strength, (int, float)) and strength == 1):
        raise ValueError(f"strength={strength} starts from a noised input: pass x_init (the clip to edit)")
    hold, cond_mask = _holder(x_cond, cond_mask, noise)
    t_shape = noise.shape[:-1]
    alpha, strength = jnp.asarray(shift, jnp.float32), jnp.asarray(strength, jnp.float32)
    for name, value in (("shift", alpha), ("strength", strength)):
        if value.ndim and value.shape != t_shape:
            raise ValueError(f"{name} has shape {value.shape}; expected a scalar or per-token {t_shape}")

    def t_at(i):
        t = jnp.broadcast_to(shift_time(strength * (1.0 - i / num_steps), alpha), t_shape)
        return t if cond_mask is None else jnp.where(cond_mask, 0.0, t)

    x = noise
    if x_init is not None:
        # shift_time(1) can round to 1 - ulp; full strength is plain generation, bit for bit.
        x = jnp.where(_expand(strength >= 1.0, noise), noise,
                      flow_interpolate(x_init, noise, t_at(0)).astype(noise.dtype))

    def step(i, x):
        t, t_next = t_at(i), t_at(i + 1)
        dt = _expand(t_next - t, x)
        v = velocity_fn(x, t)
        x_euler = x + dt * v
        if method == "euler":
            return hold(x_euler.astype(x.dtype))
        last = i == num_steps - 1
        v_next = velocity_fn(x_euler.astype(x.dtype), jnp.where(last, t, t_next))
        x_heun = x + dt * 0.5 * (v + v_next)
        return hold(jnp.where(last, x_euler, x_heun).astype(x.dtype))

    return jax.lax.fori_loop(0, num_steps, step, hold(x))


def sample_ddim(model_fn: VelocityFn, noise, schedule: DDPMSchedule, *, num_steps: int,
                prediction: str = "eps", eta=0.0, key=None, x_cond=None, cond_mask=None):
    """DDIM from t = 1 to t = 0 in num_steps even steps; model_fn(x [B, S, P], t [B, S]) predicts
    `prediction` ("eps", "v" or "x0"). eta > 0 adds fresh noise each step and needs `key`.

    x_cond, cond_mask: as in `sample_flow`.
    """
    _check_prediction(prediction)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if key is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError(f"eta={eta} samples fresh noise each step: pass key (or a Python eta=0 for "
                         "deterministic DDIM)")
    hold, cond_mask = _holder(x_cond, cond_mask, noise)
    t_shape = noise.shape[:-1]
    grid = _unshifted_grid(num_steps, 1.0)

    def t_at(i):
        t = jnp.broadcast_to(grid[i], t_shape)
        return t if cond_mask is None else jnp.where(cond_mask, 0.0, t)

    def step(i, x):
        t, t_next = t_at(i), t_at(i + 1)
        x0, eps = schedule.to_x0_eps(x, t, model_fn(x, t), prediction)
        step_key = None if key is None else jax.random.fold_in(key, i)
        return hold(ddim_step(schedule, x0, eps, t, t_next, eta=eta, key=step_key).astype(x.dtype))

    return jax.lax.fori_loop(0, num_steps, step, hold(noise))


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022).


def cfg(out_cond, out_uncond, scale):
    """uncond + scale (cond - uncond): scale 1 is the conditional model, 0 the unconditional one.

    `scale` is a scalar or per row ([B]).
    """
    return out_uncond + _expand(scale, out_cond) * (out_cond - out_uncond)


def multi_cfg(out_uncond, out_image, out_full, text_scale, image_scale):
    """Two-condition guidance of InstructPix2Pix (Brooks et al. 2023, eq. 3), for image->video and edits:
    uncond + image_scale (image - uncond) + text_scale (full - image)."""
    return (out_uncond + _expand(image_scale, out_uncond) * (out_image - out_uncond)
            + _expand(text_scale, out_uncond) * (out_full - out_image))


def _over_conditions(model_fn, conditions):
    """fn(x, t) -> one output per conditioning, from ONE model call on the batch stacked k times.

    One call keeps a single model in the compiled sampler and fills the accelerator better than k.
    """
    stacked = jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *conditions)
    k = len(conditions)

    def fn(x, t):
        out = model_fn(jnp.concatenate([x] * k, axis=0), jnp.concatenate([t] * k, axis=0), stacked)
        return jnp.split(out, k, axis=0)

    return fn


def guided_velocity_fn(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond, uncond,
                       scale) -> VelocityFn:
    """A sampler's fn(x, t) giving cfg(model(x, t, cond), model(x, t, uncond), scale).

    model_fn(x [B, S, P], t [B, S], conditioning) -> [B, S, P]; cond and uncond are pytrees with leading
    batch axis B (e.g. text tokens and their segment ids, the uncond one holding the empty caption).
    """
    both = _over_conditions(model_fn, (cond, uncond))
    return lambda x, t: cfg(*both(x, t), scale)


def multi_guided_velocity_fn(model_fn, uncond, image, full, *, text_scale, image_scale) -> VelocityFn:
    """As `guided_velocity_fn`, for `multi_cfg`'s three conditionings (none, image only, image and text)."""
    three = _over_conditions(model_fn, (uncond, image, full))
    return lambda x, t: multi_cfg(*three(x, t), text_scale=text_scale, image_scale=image_scale)
