"""Schedules, losses, samplers and guidance, held to closed forms.

The samplers are checked against exact velocity / eps fields of data distributions whose answer is
known: a Gaussian N(mu, sigma^2) per dimension (the probability-flow ODE is then the affine map
z -> mu + sigma z, since in 1D the flow is monotone) and a point mass c (every sample lands on c).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soraax import diffusion as D

B, S, P = 2, 8, 3
MU = jnp.array([1.5, -0.5, 0.0], jnp.float32)[None, None, :]
SIGMA = jnp.array([0.5, 2.0, 0.1], jnp.float32)[None, None, :]


def gaussian_velocity(x, t):
    """E[eps - x0 | x_t = x] for x0 ~ N(MU, SIGMA^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps."""
    t = t[..., None]
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    r = x - (1 - t) * MU
    return t / var * r - (MU + (1 - t) * SIGMA**2 / var * r)


def point_mass_velocity(c):
    # eps = (x - (1 - t) c) / t exactly, so v = eps - c = (x - c) / t.
    return lambda x, t: (x - c) / t[..., None]


# One compiled program per call site instead of dozens of eager ops: keeps this file fast.
sample_flow = jax.jit(D.sample_flow, static_argnums=0, static_argnames=("num_steps", "method", "strength"))
sample_ddim = jax.jit(D.sample_ddim, static_argnums=0, static_argnames=("num_steps", "prediction", "eta"))


def _noise(seed=0, shape=(B, S, P)):
    return jax.random.normal(jax.random.key(seed), shape)


def _segments():
    """Two rows: segments of 3 and 4 tokens + 1 padding; one segment of 5 + 3 padding."""
    return jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)


# ---------------------------------------------------------------------------------------------------
# Rectified flow path.


def test_velocity_target_is_the_time_derivative_of_the_path_and_flow_x0_eps_inverts_it():
    x0, eps = _noise(1), _noise(2)
    t = jax.random.uniform(jax.random.key(3), (B, S))
    x_t, dx_dt = jax.jvp(lambda t: D.flow_interpolate(x0, eps, t), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(dx_dt, D.flow_velocity_target(x0, eps), atol=1e-6)
    x0_back, eps_back = D.flow_x0_eps(x_t, D.flow_velocity_target(x0, eps), t)
    np.testing.assert_allclose(x0_back, x0, atol=1e-5)
    np.testing.assert_allclose(eps_back, eps, atol=1e-5)
    np.testing.assert_array_equal(D.flow_interpolate(x0, eps, jnp.zeros((B,))), x0)
    np.testing.assert_array_equal(D.flow_interpolate(x0, eps, jnp.ones((B,))), eps)


def test_logit_normal_is_sigmoid_of_a_gaussian():
    t = D.logit_normal(jax.random.key(0), (20000,), mean=0.5, std=0.8)
    assert bool(jnp.all((t > 0) & (t < 1)))
    logit = jnp.log(t / (1 - t))
    np.testing.assert_allclose([logit.mean(), logit.std()], [0.5, 0.8], atol=0.02)


def test_resolution_shift_fixes_endpoints_is_identity_at_base_and_monotone():
    t = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(D.resolution_shift(t, 256, 256), t, atol=1e-7)
    counts = jnp.array([16.0, 64.0, 256.0, 1024.0, 4096.0])[:, None]
    shifted = D.resolution_shift(t[None, :], counts, 256)  # [counts, t]
    np.testing.assert_allclose(shifted[:, 0], 0.0, atol=0)
    np.testing.assert_allclose(shifted[:, -1], 1.0, atol=1e-7)
    assert bool(jnp.all(jnp.diff(shifted, axis=1) > 0)), "not increasing in t"
    inner = shifted[:, 1:-1]
    assert bool(jnp.all(jnp.diff(inner, axis=0) > 0)), "more tokens must mean a noisier t"
    assert bool(jnp.all(inner[-1] > t[1:-1])) and bool(jnp.all(inner[0] < t[1:-1]))
    # SD3's alpha = 3 at 9x the base tokens: t = 0.5 -> 0.75.
    np.testing.assert_allclose(D.resolution_shift(jnp.float32(0.5), 9 * 256, 256), 0.75, rtol=1e-6)


def test_per_token_timesteps_one_t_per_segment_zero_on_padding_and_conditioning():
    segment_ids = _segments()
    cond_mask = jnp.zeros((B, S), bool).at[0, 3].set(True)
    kw = dict(max_segments=3, base_tokens=4)
    t = D.per_token_timesteps(jax.random.key(7), segment_ids, cond_mask, **kw)
    np.testing.assert_array_equal(t, D.per_token_timesteps(jax.random.key(7), segment_ids, cond_mask, **kw))
    assert not np.array_equal(t, D.per_token_timesteps(jax.random.key(8), segment_ids, cond_mask, **kw))
    t = np.asarray(t)
    assert t[0, 3] == 0 and t[0, 7] == 0 and np.all(t[1, 5:] == 0)
    assert np.all(t[0, :3] == t[0, 0]) and np.all(t[0, 4:7] == t[0, 4]) and np.all(t[1, :5] == t[1, 0])
    assert t[0, 0] != t[0, 4] and t[0, 0] != t[1, 0]
    live = t[np.asarray((segment_ids > 0) & ~cond_mask)]
    assert np.all((live > 0) & (live < 1))


def test_per_token_timesteps_shift_by_each_segments_own_size():
    # The same draw (same key) for a segment of 1 token and of 16 tokens: the big one is shifted by 4x.
    kw = dict(max_segments=2, base_tokens=1, mean=0.0, std=1.0)
    one = jnp.array([[1] + [0] * 16], jnp.int32)
    sixteen = jnp.array([[1] * 16 + [0]], jnp.int32)
    no_cond = jnp.zeros((1, 17), bool)
    t_one = D.per_token_timesteps(jax.random.key(0), one, no_cond, **kw)[0, 0]
    t_sixteen = D.per_token_timesteps(jax.random.key(0), sixteen, no_cond, **kw)[0, 0]
    np.testing.assert_allclose(t_sixteen, D.shift_time(t_one, 4.0), rtol=1e-6)


def test_token_shift_gives_each_token_its_segments_alpha():
    alpha = D.token_shift(_segments(), max_segments=3, base_tokens=4)
    np.testing.assert_allclose(alpha[0, :3], np.sqrt(3 / 4), rtol=1e-6)
    np.testing.assert_allclose(alpha[0, 3:7], 1.0, rtol=1e-6)
    np.testing.assert_allclose(alpha[1, :5], np.sqrt(5 / 4), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Losses.


def test_masked_mse_ignores_padding_and_conditioning_and_is_zero_when_nothing_counts():
    segment_ids = _segments()
    cond_mask = jnp.zeros((B, S), bool).at[0, 0].set(True)
    pred, target = _noise(1), _noise(2)
    loss = D.masked_mse(pred, target, segment_ids, cond_mask)
    counted = np.asarray(D.loss_weights(segment_ids, cond_mask), bool)
    per_token = np.mean((np.asarray(pred) - np.asarray(target)) ** 2, axis=-1)
    np.testing.assert_allclose(loss, per_token[counted].mean(), rtol=1e-6)
    ignored = jnp.asarray(~counted)[..., None]
    wild = jnp.where(ignored, jnp.array(np.inf, jnp.float32), pred)
    np.testing.assert_allclose(D.masked_mse(wild, target, segment_ids, cond_mask), loss, rtol=1e-6)
    grad = jax.grad(lambda p: D.masked_mse(p, target, segment_ids, cond_mask))(wild)
    assert np.all(np.asarray(grad)[~counted] == 0) and np.all(np.isfinite(grad))
    nothing = D.masked_mse(pred, target, jnp.zeros((B, S), jnp.int32), cond_mask)
    assert float(nothing) == 0.0
    all_cond = jax.grad(lambda p: D.masked_mse(p, target, segment_ids, jnp.ones((B, S), bool)))(pred)
    assert np.all(np.isfinite(all_cond)) and np.all(np.asarray(all_cond) == 0)


# ---------------------------------------------------------------------------------------------------
# Flow samplers against exact fields.


def _gauss_error(method, num_steps, shift=1.0, noise=None):
    noise = _noise(0) if noise is None else noise
    x = sample_flow(gaussian_velocity, noise, num_steps=num_steps, method=method, shift=shift)
    return float(jnp.max(jnp.abs(x - (MU + SIGMA * noise))))


def test_euler_and_heun_transport_noise_to_the_gaussian_with_their_orders_of_accuracy():
    euler = [_gauss_error("euler", n) for n in (32, 64)]
    heun = [_gauss_error("heun", n) for n in (32, 64)]
    assert euler[1] < 0.15 and heun[1] < 3e-3, (euler, heun)
    assert heun[0] < euler[0] / 10, "Heun must beat Euler at the same steps"
    # First order halves the error with twice the steps; second order quarters it.
    assert 0.4 < euler[1] / euler[0] < 0.6, euler
    assert 0.15 < heun[1] / heun[0] < 0.35, heun


def test_samples_have_the_datas_mean_and_std():
    noise = _noise(5, (1, 4096, P))
    x = sample_flow(gaussian_velocity, noise, num_steps=32, method="heun")
    np.testing.assert_allclose(x.mean(axis=(0, 1)), MU[0, 0], atol=4 * float(SIGMA.max()) / 64)
    np.testing.assert_allclose(x.std(axis=(0, 1)), SIGMA[0, 0], rtol=0.05)


def test_shifted_and_per_token_shifted_grids_reach_the_same_samples():
    # The ODE does not depend on the grid; a shift only moves where the steps fall.
    # (A shift > 1 puts fewer steps near t = 0, where the narrowest dimension's field bends.)
    alpha = D.token_shift(_segments(), max_segments=3, base_tokens=2)
    assert _gauss_error("heun", 128, shift=3.0) < 6e-3
    assert _gauss_error("heun", 128, shift=alpha) < 6e-3


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_point_mass_data_every_sample_lands_on_it(method):
    c = jnp.broadcast_to(jnp.array([0.3, -2.0, 5.0]), (B, S, P))
    x = sample_flow(point_mass_velocity(c), _noise(0), num_steps=5, method=method, shift=2.0)
    np.testing.assert_allclose(x, c, atol=1e-5)


def test_strength_starts_from_the_noised_input():
    x_init, noise = _noise(1), _noise(2)
    same = sample_flow(gaussian_velocity, noise, num_steps=4, strength=0.0, x_init=x_init)
    np.testing.assert_array_equal(same, x_init)
    full = sample_flow(gaussian_velocity, noise, num_steps=4, strength=1.0, x_init=x_init)
    np.testing.assert_allclose(full, sample_flow(gaussian_velocity, noise, num_steps=4), atol=1e-6)
    c = jnp.full((B, S, P), 0.7)
    edited = sample_flow(point_mass_velocity(c), noise, num_steps=3, strength=0.4, shift=2.0, x_init=x_init)
    np.testing.assert_allclose(edited, c, atol=1e-5)
    with pytest.raises(ValueError, match="x_init"):
        sample_flow(gaussian_velocity, noise, num_steps=4, strength=0.5)


def test_flow_timesteps_run_from_start_to_zero_like_training_shift():
    t = D.flow_timesteps(10, shift=3.0)
    assert float(t[0]) == 1.0 and float(t[-1]) == 0.0 and bool(jnp.all(jnp.diff(t) < 0))
    np.testing.assert_allclose(t, D.shift_time(jnp.linspace(1.0, 0.0, 11), 3.0), atol=1e-6)
    np.testing.assert_allclose(D.flow_timesteps(4, shift=3.0, strength=0.5)[0], D.shift_time(0.5, 3.0))


def _cond_setup():
    cond_mask = jnp.zeros((B, S), bool).at[:, :2].set(True)
    x_cond = _noise(9) * 3.0
    return x_cond, cond_mask


def _watching_t_at_cond(velocity_fn, cond_mask):
    # NaN everywhere if the network ever sees a conditioning token at t != 0.
    def fn(x, t):
        leak = jnp.any(cond_mask & (t != 0))
        return velocity_fn(x, t) + jnp.where(leak, jnp.nan, 0.0)
    return fn


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_conditioning_tokens_stay_exactly_at_x_cond(method):
    x_cond, cond_mask = _cond_setup()
    fn = _watching_t_at_cond(gaussian_velocity, cond_mask)
    x = sample_flow(fn, _noise(0), num_steps=6, method=method, shift=2.0, x_cond=x_cond,
                      cond_mask=cond_mask)
    np.testing.assert_array_equal(x[:, :2], x_cond[:, :2])
    # The free tokens still follow the exact field (it is per token).
    free = sample_flow(gaussian_velocity, _noise(0), num_steps=6, method=method, shift=2.0)
    np.testing.assert_allclose(x[:, 2:], free[:, 2:], atol=1e-6)


def test_sample_flow_jits_to_one_program_whatever_the_number_of_steps():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def sampler(noise):
        return sample_flow(gaussian_velocity, noise, num_steps=8, method="heun")

    sampler(_noise(0)).block_until_ready()
    sampler(_noise(1)).block_until_ready()

    traces = []

    def counting_velocity(x, t):
        traces.append(num_steps)
        return gaussian_velocity(x, t)

    for num_steps in (4, 32):
        jax.jit(lambda noise: sample_flow(counting_velocity, noise, num_steps=num_steps, method="heun"))(
            _noise(0))
    # Heun's two call sites, traced once each, for any num_steps: the loop is not unrolled.
    assert traces == [4, 4, 32, 32], traces


# ---------------------------------------------------------------------------------------------------
# DDPM-style schedules and DDIM.


def test_cosine_schedule_matches_its_closed_form_and_q_sample_has_that_mean_and_variance():
    sched = D.DDPMSchedule.cosine(1000)
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    steps = np.array([0, 1, 250, 500, 900])
    np.testing.assert_allclose(sched.alpha_bar(jnp.asarray(steps / 1000.0)), f(steps / 1000.0), rtol=1e-4)
    np.testing.assert_allclose(sched.alpha_bar(steps[1:] / 1000.0), sched.alphas_bar[steps[1:] - 1],
                               rtol=1e-5)
    x0 = jnp.full((1, 50000, 1), 2.0)
    t = jnp.full((1, 50000), 0.5)
    x_t = sched.q_sample(x0, jax.random.normal(jax.random.key(0), x0.shape), t)
    abar = f(0.5)
    np.testing.assert_allclose(x_t.mean(), 2.0 * np.sqrt(abar), atol=0.01)
    np.testing.assert_allclose(x_t.var(), 1 - abar, rtol=0.02)


def test_linear_schedule_is_ho_et_al_and_decreasing():
    sched = D.DDPMSchedule.linear(1000)
    np.testing.assert_allclose(sched.alphas_bar, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-4)
    abar = sched.alpha_bar(jnp.linspace(0.0, 1.0, 2001))
    assert float(abar[0]) == 1.0 and bool(jnp.all(jnp.diff(abar) < 0))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions_invert_the_targets_exactly(prediction):
    sched = D.DDPMSchedule.linear(1000)
    x0, eps = _noise(1), _noise(2)
    t = jax.random.uniform(jax.random.key(3), (B, S), minval=0.01, maxval=0.95)
    x_t = sched.q_sample(x0, eps, t)
    x0_back, eps_back = sched.to_x0_eps(x_t, t, sched.target(x0, eps, t, prediction), prediction)
    np.testing.assert_allclose(x0_back, x0, atol=2e-4)
    np.testing.assert_allclose(eps_back, eps, atol=2e-4)


def point_mass_eps(sched, c):
    def fn(x, t):
        alpha, sigma = sched.alpha_sigma(t)
        return (x - alpha[..., None] * c) / sigma[..., None]
    return fn


@pytest.mark.parametrize("prediction,eta", [("eps", 0.0), ("v", 0.0), ("x0", 0.0), ("eps", 1.0)])
def test_ddim_with_the_true_prediction_of_a_point_mass_recovers_it(prediction, eta):
    sched = D.DDPMSchedule.cosine(1000)
    c = jnp.broadcast_to(jnp.array([0.3, -2.0, 1.0]), (B, S, P))
    eps_fn = point_mass_eps(sched, c)
    model_fn = lambda x, t: sched.target(c, eps_fn(x, t), t, prediction)
    x = sample_ddim(model_fn, _noise(0), sched, num_steps=10, prediction=prediction, eta=eta,
                      key=jax.random.key(1) if eta else None)
    np.testing.assert_allclose(x, c, atol=1e-3)


def test_ddim_with_true_gaussian_eps_converges_to_the_probability_flow_map_at_first_order():
    sched = D.DDPMSchedule.linear(1000)

    def eps_fn(x, t):
        alpha, sigma = (a[..., None] for a in sched.alpha_sigma(t))
        return sigma / (alpha**2 * SIGMA**2 + sigma**2) * (x - alpha * MU)

    def v_fn(x, t):
        eps = eps_fn(x, t)
        return sched.target(sched.to_x0_eps(x, t, eps, "eps")[0], eps, t, "v")

    noise = _noise(0)
    a1, s1 = (float(a) for a in sched.alpha_sigma(1.0))
    exact = MU + SIGMA * (noise - a1 * MU) / jnp.sqrt(a1**2 * SIGMA**2 + s1**2)
    x100, x200 = (sample_ddim(eps_fn, noise, sched, num_steps=n) for n in (100, 200))
    err100, err200 = (float(jnp.max(jnp.abs(x - exact))) for x in (x100, x200))
    assert err100 < 0.1 and 0.4 < err200 / err100 < 0.6, (err100, err200)
    # The same field given as v: the same trajectory.
    np.testing.assert_allclose(sample_ddim(v_fn, noise, sched, num_steps=100, prediction="v"), x100,
                               atol=1e-3)


def test_ddim_holds_conditioning_tokens_and_shows_them_at_t0():
    sched = D.DDPMSchedule.linear(1000)
    x_cond, cond_mask = _cond_setup()
    c = jnp.full((B, S, P), -1.0)
    fn = _watching_t_at_cond(point_mass_eps(sched, c), cond_mask)
    x = sample_ddim(fn, _noise(0), sched, num_steps=8, eta=0.5, key=jax.random.key(0),
                      x_cond=x_cond, cond_mask=cond_mask)
    np.testing.assert_array_equal(x[:, :2], x_cond[:, :2])
    np.testing.assert_allclose(x[:, 2:], c[:, 2:], atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# Guidance.


def test_cfg_endpoints_and_multi_cfg_reductions():
    cond, uncond, image = _noise(1), _noise(2), _noise(3)
    np.testing.assert_allclose(D.cfg(cond, uncond, 1.0), cond, atol=1e-6)
    np.testing.assert_array_equal(D.cfg(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(D.cfg(cond, uncond, 3.0), uncond + 3 * (cond - uncond), atol=1e-6)
    per_row = D.cfg(cond, uncond, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(per_row[0], uncond[0], atol=1e-6)
    np.testing.assert_allclose(per_row[1], cond[1], atol=1e-6)
    np.testing.assert_allclose(D.multi_cfg(uncond, image, cond, 1.0, 1.0), cond, atol=1e-6)
    np.testing.assert_allclose(D.multi_cfg(uncond, image, cond, 0.0, 1.0), image, atol=1e-6)
    np.testing.assert_allclose(D.multi_cfg(uncond, image, cond, 0.0, 0.0), uncond, atol=1e-6)
    # With no image effect (image == uncond), it is plain cfg on the text.
    np.testing.assert_allclose(D.multi_cfg(uncond, uncond, cond, 4.0, 2.0), D.cfg(cond, uncond, 4.0),
                               atol=1e-5)


def test_guided_velocity_fn_batches_conditions_into_one_call():
    calls = []

    def model_fn(x, t, text):
        calls.append(x.shape[0])
        return x * text["scale"][:, None, None] + t[..., None]

    cond, uncond = {"scale": jnp.array([2.0, 3.0])}, {"scale": jnp.array([0.5, -1.0])}
    x, t = _noise(0), jnp.full((B, S), 0.3)
    guided = D.guided_velocity_fn(model_fn, cond, uncond, 4.0)(x, t)
    assert calls == [2 * B]
    want = D.cfg(model_fn(x, t, cond), model_fn(x, t, uncond), 4.0)
    np.testing.assert_allclose(guided, want, atol=1e-5)
    image = {"scale": jnp.array([1.0, 1.0])}
    multi = D.multi_guided_velocity_fn(model_fn, uncond, image, cond, text_scale=2.0, image_scale=1.5)(x, t)
    want = D.multi_cfg(model_fn(x, t, uncond), model_fn(x, t, image), model_fn(x, t, cond), 2.0, 1.5)
    np.testing.assert_allclose(multi, want, atol=1e-5)


def test_errors_name_what_is_wrong():
    sched = D.DDPMSchedule.linear(10)
    with pytest.raises(ValueError, match="prediction"):
        sched.target(_noise(0), _noise(1), jnp.zeros((B, S)), "score")
    with pytest.raises(ValueError, match="key"):
        sample_ddim(lambda x, t: x, _noise(0), sched, num_steps=2, eta=1.0)
    with pytest.raises(ValueError, match="shift"):
        sample_flow(gaussian_velocity, _noise(0), num_steps=2, shift=jnp.ones((B,)))
    with pytest.raises(ValueError, match="x_cond"):
        sample_flow(gaussian_velocity, _noise(0), num_steps=2, cond_mask=jnp.zeros((B, S), bool))


def test_high_noise_mixture_redraws_its_share_in_the_high_range_and_rate_zero_changes_nothing():
    segment_ids = _segments()
    cond_mask = jnp.zeros((B, S), bool).at[0, 3].set(True)
    kw = dict(max_segments=3, base_tokens=4)
    key = jax.random.key(7)
    np.testing.assert_array_equal(D.per_token_timesteps(key, segment_ids, cond_mask, **kw),
                                  D.per_token_timesteps(key, segment_ids, cond_mask, high_noise_rate=0.0, **kw))
    t = np.asarray(D.per_token_timesteps(key, segment_ids, cond_mask, high_noise_rate=1.0, high_noise_min=0.8,
                                         **kw))
    live = (np.asarray(segment_ids) > 0) & ~np.asarray(cond_mask)
    assert np.all((t[live] >= 0.8) & (t[live] < 1)) and np.all(t[~live] == 0)
    assert np.all(t[0, :3] == t[0, 0]), "still one t per segment"
    draws = np.asarray(D.high_noise_mixture(jax.random.key(1), jnp.full((20_000,), 0.3), 0.25, 0.9))
    high = draws != np.float32(0.3)
    assert abs(high.mean() - 0.25) < 0.015
    assert draws[high].min() >= 0.9 and draws[high].max() < 1 and abs(draws[high].mean() - 0.95) < 0.005
