"""Unit tests of the training pieces: objectives, optimizer, EMA, train step, sharding rules, latent cache,
checkpoint helpers, configs, TFDS without TensorFlow. End-to-end runs of train.py: tests/test_train_script.py."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sdjax import checkpoint, latent_cache, schedulers, sharding, training, variants
from sdjax.data import preprocess

ROOT = Path(__file__).resolve().parents[1]
SCHED = variants.SCHEDULERS["sd1"]
AC = jnp.asarray(schedulers.alphas_cumprod(SCHED))


def load_config(name: str, **overrides):
    sys.path.insert(0, str(ROOT))
    try:
        config = importlib.import_module(f"configs.{name}").get_config()
    finally:
        sys.path.remove(str(ROOT))
    with config.unlocked():
        for key, value in overrides.items():
            target = config
            *parents, leaf = key.split(".")
            for p in parents:
                target = target[p]
            target[leaf] = value
    return config


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------

def test_targets_match_their_definitions():
    key = jax.random.key(0)
    x0 = jax.random.normal(key, (3, 4, 4, 4))
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([0, 500, 999])
    a = np.asarray(AC)[np.asarray(t)].reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(training.diffusion_target("epsilon", AC, x0, noise, t), noise)
    np.testing.assert_allclose(training.diffusion_target("v_prediction", AC, x0, noise, t),
                               np.sqrt(a) * noise - np.sqrt(1 - a) * x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(training.diffusion_target("sample", AC, x0, noise, t), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        training.diffusion_target("flow", AC, x0, noise, t)


@pytest.mark.parametrize("prediction_type", training.PREDICTION_TYPES)
def test_min_snr_weights(prediction_type):
    t = jnp.array([10, 300, 900])
    snr = np.asarray(AC)[np.asarray(t)] / (1 - np.asarray(AC)[np.asarray(t)])
    clipped = np.minimum(snr, 5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    np.testing.assert_allclose(training.min_snr_weights(AC, t, prediction_type, 5.0), expected, rtol=1e-5)
    np.testing.assert_array_equal(training.min_snr_weights(AC, t, prediction_type, 0.0), np.ones(3))


def test_min_snr_epsilon_weight_at_zero_terminal_snr_is_one_not_nan():
    """At t = 999 of a zero-terminal-SNR schedule snr = 0 and the epsilon weight min(snr, g) / snr is 0 / 0.
    diffusers (train_text_to_image.py, train_dreambooth.py as of 2026-08) computes exactly that, a NaN weight and a
    NaN loss; sdjax gives 1, the formula's limit (it is 1 for every 0 < snr < g)."""
    zero_snr = dict(variants.get("shapes").scheduler, prediction_type="epsilon")  # DDIM, rescale_betas_zero_snr
    ac = jnp.asarray(schedulers.alphas_cumprod(zero_snr))
    assert float(ac[999]) == 0.0 and float(schedulers.snr(ac, 999)) == 0.0
    np.testing.assert_allclose(training.min_snr_weights(ac, jnp.array([999, 998, 0]), "epsilon", 5.0),
                               [1.0, 1.0, 5.0 / float(schedulers.snr(ac, 0))], rtol=1e-6)
    assert float(training.min_snr_weights(ac, jnp.array([999]), "v_prediction", 5.0)[0]) == 0.0  # 0 / 1
    latents = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 4, 4)), jnp.float32)

    def loss(scale):  # a "UNet" scale * x_t; every drawn timestep is 999
        return training.diffusion_loss(lambda x, t, c: scale * x, latents, None, jax.random.key(1), ac,
                                       prediction_type="epsilon", min_snr_gamma=5.0, t_min=999, t_max=1000)

    (value, aux), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.float32(0.5))
    assert np.all(np.asarray(aux["t"]) == 999)
    assert float(value) == pytest.approx(float(jnp.mean(aux["mse"])), rel=1e-6)  # weight 1
    assert np.isfinite(float(value)) and np.isfinite(float(grad)) and float(grad) != 0.0


@pytest.mark.parametrize("prediction_type", training.PREDICTION_TYPES)
def test_diffusion_loss_is_zero_for_an_oracle_and_respects_the_timestep_range(prediction_type):
    latents = jax.random.normal(jax.random.key(2), (6, 4, 4, 4))
    context = jnp.zeros((6, 77, 8))

    def oracle(noisy, t, ctx):  # recovers the noise from x_t and x_0, then answers in the target's terms
        a = AC[t].reshape(-1, 1, 1, 1)
        noise = (noisy - jnp.sqrt(a) * latents) / jnp.sqrt(1 - a)
        return training.diffusion_target(prediction_type, AC, latents, noise, t)

    loss, aux = training.diffusion_loss(oracle, latents, context, jax.random.key(3), AC,
                                        prediction_type=prediction_type, min_snr_gamma=5.0, t_min=100, t_max=200)
    assert float(loss) < 1e-6
    assert np.all((np.asarray(aux["t"]) >= 100) & (np.asarray(aux["t"]) < 200))
    zero, aux = training.diffusion_loss(lambda x, t, c: jnp.zeros_like(x), latents, context, jax.random.key(3), AC,
                                        prediction_type=prediction_type)
    assert float(zero) > 0.1


def test_offset_noise_shifts_each_channel():
    plain = training.sample_noise(jax.random.key(0), (64, 8, 8, 4))
    offset = training.sample_noise(jax.random.key(0), (64, 8, 8, 4), offset_noise=1.0)
    # per-(image, channel) means: std 1/8 for plain noise, about sqrt(1 + 1/64) with offset noise
    assert float(jnp.std(plain.mean(axis=(1, 2)))) < 0.2
    assert float(jnp.std(offset.mean(axis=(1, 2)))) > 0.6


def test_timestep_bias_draws_the_chosen_portion_more_often():
    assert training.timestep_bias_logits(0, 1000) is None
    assert training.timestep_bias_logits(0, 1000, "later", 0.25, 1.0) is None
    # last quarter three times as likely: 3*250 / (750 + 3*250) = half the draws
    later = training.sample_timesteps(jax.random.key(0), 20_000, 100, 1000,
                                      training.timestep_bias_logits(100, 1000, "later", 0.25, 3.0))
    assert int(later.min()) >= 100 and int(later.max()) <= 999
    assert abs(float(jnp.mean(later >= 775)) - 0.5) < 0.02
    earlier = training.sample_timesteps(jax.random.key(1), 20_000, 0, 1000,
                                        training.timestep_bias_logits(0, 1000, "earlier", 0.2, 4.0))
    assert abs(float(jnp.mean(earlier < 200)) - 0.5) < 0.02  # 4*200 / (800 + 4*200)
    with pytest.raises(ValueError, match="unknown timestep bias 'late'"):
        training.timestep_bias_logits(0, 1000, "late", 0.25, 3.0)
    with pytest.raises(ValueError, match="portion"):
        training.timestep_bias_logits(0, 1000, "later", 1.5, 3.0)


def test_autoencoder_loss_and_kl():
    mean = jnp.array([[[[1.0, 0.0]]]])
    logvar = jnp.array([[[[0.0, jnp.log(2.0)]]]])
    # KL(N(1, 1) || N(0, 1)) = 0.5, KL(N(0, 2) || N(0, 1)) = 0.5 * (2 - 1 - log 2)
    np.testing.assert_allclose(training.kl_divergence(mean, logvar), [0.5 + 0.5 * (1 - np.log(2))], rtol=1e-6)

    class Identity:  # a "VAE" whose latents are the image and whose posterior is a point mass
        def encode(self, x):
            return x, jnp.full_like(x, -30.0)

        def decode(self, z):
            return z

    images = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), minval=-1, maxval=1)
    loss, aux = training.autoencoder_loss(Identity(), images, jax.random.key(1), reconstruction="l2", kl_weight=0.0)
    assert float(aux["recon"]) < 1e-10 and float(loss) < 1e-8
    with pytest.raises(ValueError, match="l1"):
        training.autoencoder_loss(Identity(), images, jax.random.key(1), reconstruction="ssim")


# ---------------------------------------------------------------------------------------------------------
# Optimizer, EMA, train step
# ---------------------------------------------------------------------------------------------------------

def test_lr_schedules():
    const = training.lr_schedule(1e-3, num_steps=100, warmup_steps=10)
    assert float(const(0)) == 0.0 and float(const(5)) == pytest.approx(5e-4) and float(const(50)) == pytest.approx(1e-3)
    cos = training.lr_schedule(1e-3, num_steps=100, warmup_steps=10, schedule="cosine", end_fraction=0.1)
    assert float(cos(10)) == pytest.approx(1e-3) and float(cos(100)) == pytest.approx(1e-4, rel=1e-4)
    assert float(training.lr_schedule(1e-3, num_steps=100)(0)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="cosine"):
        training.lr_schedule(1e-3, num_steps=10, schedule="linear")


def test_optimizer_per_module_learning_rates_and_errors():
    opt = load_config("train_base").optimizer
    with opt.unlocked():
        opt.warmup_steps, opt.learning_rate, opt.text_encoder_learning_rate = 0, 1e-3, 1e-4
    tx, schedules = training.make_optimizer(opt, num_steps=10, trainable=("unet", "text_encoder"))
    assert float(schedules["unet"](3)) == pytest.approx(1e-3) and float(schedules["text_encoder"](3)) == pytest.approx(1e-4)
    params = {"unet": {"w": jnp.ones(3)}, "text_encoder": {"w": jnp.ones(3)}}
    grads = {"unet": {"w": jnp.ones(3)}, "text_encoder": {"w": jnp.ones(3)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # AdamW's first step moves each weight by about its lr (plus weight decay)
    assert float(-updates["unet"]["w"][0]) == pytest.approx(1e-3, rel=0.05)
    assert float(-updates["text_encoder"]["w"][0]) == pytest.approx(1e-4, rel=0.05)
    with opt.unlocked():
        opt.name = "no_such_optimizer"
    with pytest.raises(ValueError, match="not an optax optimizer"):
        training.make_optimizer(opt, num_steps=10, trainable=("unet",))
    with opt.unlocked():
        opt.name, opt.kwargs.b3 = "adamw", 0.5
    with pytest.raises(ValueError, match="optimizer.kwargs"):
        training.make_optimizer(opt, num_steps=10, trainable=("unet",))


def test_ema():
    ema, params = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    np.testing.assert_allclose(training.ema_update(ema, params, 0.9)["w"], [0.1, 0.1], rtol=1e-6)
    assert float(training.ema_decay_at(0.999, 0, True)) == pytest.approx(0.1)
    assert float(training.ema_decay_at(0.999, 10 ** 6, True)) == pytest.approx(0.999)
    assert float(training.ema_decay_at(0.9, 0, False)) == pytest.approx(0.9)


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(3, 1, rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


def _linear_step(accum: int, ema_decay: float = 0.5, ema_warmup: bool = False):
    graphdefs, params = training.split_modules({"unet": _Linear(nnx.Rngs(0))})

    def loss_fn(modules, batch, rng):
        pred = modules["unet"](batch["x"])[:, 0]
        return jnp.mean((pred - batch["y"]) ** 2), {}

    opt = load_config("train_base").optimizer
    with opt.unlocked():
        opt.warmup_steps, opt.learning_rate, opt.grad_accum_steps = 0, 0.1, accum
    tx, schedules = training.make_optimizer(opt, num_steps=10, trainable=("unet",))
    step = jax.jit(training.make_train_step(graphdefs, loss_fn, tx, schedules, grad_accum_steps=accum,
                                            ema_decay=ema_decay, ema_warmup=ema_warmup))
    state = training.init_state(params, tx, seed=0, ema_decay=ema_decay)
    batch = {"x": jnp.arange(12.0).reshape(4, 3) / 10, "y": jnp.ones(4)}
    return step, state, batch


def test_train_step_lowers_the_loss_and_tracks_ema():
    step, state, batch = _linear_step(accum=1)
    kernel0 = np.asarray(state["params"]["unet"]["layer"]["kernel"])
    losses = []
    for _ in range(20):
        state, metrics = step(state, {}, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0] and int(state["step"]) == 20
    kernel, ema = state["params"]["unet"]["layer"]["kernel"], state["ema"]["unet"]["layer"]["kernel"]
    assert not np.allclose(ema, kernel0) and not np.allclose(ema, kernel)
    assert set(metrics) >= {"loss", "grad_norm", "lr", "lr_unet"}


def test_gradient_accumulation_updates_every_k_steps():
    step, state, batch = _linear_step(accum=2)
    kernel0 = np.asarray(state["params"]["unet"]["layer"]["kernel"])
    state, _ = step(state, {}, batch)
    np.testing.assert_array_equal(state["params"]["unet"]["layer"]["kernel"], kernel0)
    np.testing.assert_array_equal(state["ema"]["unet"]["layer"]["kernel"], kernel0)
    state, _ = step(state, {}, batch)
    assert not np.allclose(state["params"]["unet"]["layer"]["kernel"], kernel0)
    assert not np.allclose(state["ema"]["unet"]["layer"]["kernel"], kernel0)


@pytest.mark.parametrize("warmup", [False, True], ids=["constant", "warmup"])
@pytest.mark.parametrize("accum", [1, 3])
def test_ema_is_the_formula_applied_to_the_parameter_history(warmup, accum):
    """After optimizer update n = 1, 2, ...: ema_n = d_n * ema_(n-1) + (1 - d_n) * params_n, ema_0 = the initial
    parameters, d_n = decay, or with warm-up min(decay, (1 + n) / (10 + n)); micro-steps between updates leave
    it alone."""
    decay = 0.9  # above the warm-up's (1 + n) / (10 + n) for n <= 6: the two settings give different EMAs
    step, state, batch = _linear_step(accum=accum, ema_decay=decay, ema_warmup=warmup)

    def flat(tree):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)

    expected, history, n = flat(state["params"]), [flat(state["params"])], 0
    for micro in range(6 * accum):
        state, _ = step(state, {}, batch)
        if (micro + 1) % accum == 0:
            n += 1
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            expected = d * expected + (1 - d) * flat(state["params"])
            history.append(flat(state["params"]))
        np.testing.assert_allclose(flat(state["ema"]), expected, rtol=1e-6, atol=1e-7)
    assert n == 6 and all(np.abs(a - b).max() > 1e-3 for a, b in zip(history, history[1:]))  # params moved


def test_check_finite_names_the_step_and_a_fix():
    training.check_finite(3, {"loss": 1.0})
    with pytest.raises(FloatingPointError, match=r"step 7 .*learning_rate"):
        training.check_finite(7, {"loss": float("nan"), "grad_norm": 1.0})
    with pytest.raises(FloatingPointError, match="inf"):
        training.check_finite(1, {"loss": float("inf")})


def test_trainable_modules_and_model_config_errors():
    assert training.trainable_modules(load_config("tiny")) == ("unet",)
    assert training.trainable_modules(load_config("train_scratch")) == ("unet", "text_encoder")
    assert training.trainable_modules(load_config("train_autoencoder")) == ("vae",)
    with pytest.raises(ValueError, match="init_from and model.variant are both empty"):
        training.build_models(load_config("finetune_sd15"))
    with pytest.raises(FileNotFoundError, match="no VAE found"):
        training.build_models(load_config("tiny", **{"model.init_from": str(ROOT / "tests")}))
    with pytest.raises(ValueError, match="model.dtype"):
        training.build_models(load_config("tiny", **{"model.dtype": "fp8"}))


def test_make_loss_fn_checks_the_timestep_range():
    with pytest.raises(ValueError, match="timestep_min"):
        training.make_loss_fn(load_config("tiny", **{"objective.timestep_min": 900, "objective.timestep_max": 100}),
                              scheduler_config=SCHED)
    with pytest.raises(ValueError, match="unknown timestep bias"):
        training.make_loss_fn(load_config("tiny", **{"objective.timestep_bias": "high"}), scheduler_config=SCHED)


# ---------------------------------------------------------------------------------------------------------
# Start-up: planned random init, the sharded train state
# ---------------------------------------------------------------------------------------------------------

class _EveryInitializer(nnx.Module):
    """sdjax's layers: every initializer they name."""

    def __init__(self, rngs):
        from sdjax import layers

        self.conv = layers.conv(4, 8, 3, rngs=rngs)
        self.embed = layers.embed(50, 8, rngs=rngs)
        self.norms = nnx.List([layers.GroupNorm(2, 8, rngs=rngs), layers.LayerNorm(8, rngs=rngs)])


def test_planned_init_is_the_jitted_flax_init_bit_for_bit():
    """What train.py did until now, jit a construction with nnx.Rngs(seed), against a plan's values (flat draws in
    buckets, cut on the host), for modules that skip another's draws, a uniform fan_avg and bfloat16."""
    from sdjax import initializers, layers

    def build(rngs):  # modules drawing from one stream, as a variant's three do; "b" is left out below
        return {"a": _EveryInitializer(rngs), "b": layers.LayerNorm(8, rngs=rngs),
                "c": nnx.List([nnx.Linear(8, 3, kernel_init=initializers.VarianceScaling(2.0, "fan_avg", "uniform"),
                                          bias_init=initializers.Constant(0.5), rngs=rngs),
                               layers.conv(4, 8, 3, param_dtype=jnp.bfloat16, rngs=rngs)])}

    reference = jax.jit(lambda: training.split_modules(build(nnx.Rngs(7)))[1])()
    modules, plan = initializers.plan(build)
    assert plan.num_draws == 7 + 2 + 4
    graphdefs, abstract = training.split_modules(modules)
    assert graphdefs == training.split_modules(nnx.eval_shape(lambda: build(nnx.Rngs(0))))[0]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                               reference)
    values = plan.values({"a": abstract["a"], "c": abstract["c"]}, seed=7)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(values),
                                 jax.tree.leaves({"a": reference["a"], "c": reference["c"]})):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(got, np.asarray(want), err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="not created by this plan"):
        plan.values({"a": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract["a"])}, seed=7)


def test_planned_init_buckets_and_variances():
    """Draws are grouped by (initializer, dtype), then bucketed: a bucket draws its largest size for every row;
    a size joins while it is at least half of that, or the bucket's padding stays within the slack."""
    from sdjax import initializers

    def leaf(size, init=initializers.LECUN_NORMAL, dtype=np.dtype("float32")):
        return ("m", (), jax.ShapeDtypeStruct((size,), dtype), size, init)

    slack = initializers._BUCKET_SLACK
    sizes = [10, 4 * slack, slack // 2, 3 * slack, 1000]
    buckets = initializers._buckets([leaf(n) for n in sizes] + [leaf(7, initializers.EMBEDDING),
                                                                leaf(5, dtype=np.dtype("bfloat16"))])
    assert [(key[0], key[1].name, size, [row[3] for row in rows]) for key, size, rows in buckets] == [
        (initializers.LECUN_NORMAL, "float32", 4 * slack, [4 * slack, 3 * slack]),
        (initializers.LECUN_NORMAL, "float32", slack // 2, [slack // 2, 1000, 10]),
        (initializers.EMBEDDING, "float32", 7, [7]), (initializers.LECUN_NORMAL, "bfloat16", 5, [5])]
    # jax.nn.initializers.variance_scaling's fans: a conv kernel (3, 3, in=4, out=8), an embedding (50, 8)
    shape = (3, 3, 4, 8)
    for mode, fan in (("fan_in", 36), ("fan_out", 72), ("fan_avg", 54), ("fan_geo_avg", (36 * 72) ** 0.5)):
        assert initializers.VarianceScaling(2.0, mode, "normal").variance(shape) == 2.0 / fan
    assert initializers.EMBEDDING.variance((50, 8)) == 1 / 8


def test_a_flax_default_initializer_cannot_be_planned():
    from sdjax import initializers

    with pytest.raises(TypeError):
        initializers.plan(lambda rngs: nnx.Linear(2, 3, rngs=rngs))


def test_planned_variant_has_the_structure_of_the_built_one():
    class OneKey:  # a cheap way to trace a construction for its structure (an nnx.Rngs is slow to trace)
        def params(self):
            return jax.random.key(0)

    from sdjax.autoencoder import AutoencoderKL
    from sdjax.clip import CLIPTextEncoder
    from sdjax.unet import UNet2DConditionModel

    variant = variants.get("tiny")
    planned, plan = variant.plan()
    traced = nnx.eval_shape(lambda: {"text_encoder": CLIPTextEncoder(variant.text_encoder, rngs=OneKey()),
                                     "unet": UNet2DConditionModel(variant.unet, rngs=OneKey()),
                                     "vae": AutoencoderKL(variant.vae, rngs=OneKey())})
    assert list(planned) == ["text_encoder", "unet", "vae"]
    for name in traced:
        g1, s1 = nnx.split(planned[name])
        g2, s2 = nnx.split(traced[name])
        assert g1 == g2
        assert jax.tree.map(lambda x: (x.shape, x.dtype), s1) == jax.tree.map(lambda x: (x.shape, x.dtype), s2)
    assert plan.num_draws == len(plan.records) == 368
    unet_only, unet_plan = variant.plan(["unet"])  # built up to the UNet: the VAE's draws come after
    assert list(unet_only) == ["unet"] and unet_plan.num_draws < 368
    assert variant.plan([])[0] == {}


def test_sharded_init_state_is_the_jitted_init_state():
    mesh = sharding.make_mesh(1, 1)
    params = {"unet": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}}
    tx, _ = training.make_optimizer(load_config("tiny").optimizer, num_steps=10, trainable=("unet",))
    for ema_decay in (0.0, 0.99):
        abstract = jax.eval_shape(lambda p: training.init_state(p, tx, seed=3, ema_decay=ema_decay), params)
        shardings = sharding.param_shardings(mesh, abstract)
        want = jax.jit(lambda p: training.init_state(p, tx, seed=3, ema_decay=ema_decay),
                       out_shardings=shardings)(params)
        got = training.sharded_init_state(params, tx, shardings, seed=3, ema_decay=ema_decay)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(shardings)):
            assert a.sharding == s and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        if ema_decay:  # the EMA is its own buffer: the train step donates the state
            assert all(e.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()
                       for e, p in zip(jax.tree.leaves(got["ema"]), jax.tree.leaves(got["params"])))


# ---------------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------------

def test_fsdp_rule_picks_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((3, 3, 320, 640), 4) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((1280, 320), 4) == P("fsdp", None)
    assert sharding.fsdp_spec((6, 10), 4) == P()             # nothing divisible: replicated
    assert sharding.fsdp_spec((1024,), 4, min_size=4096) == P()  # small: replicated
    assert sharding.fsdp_spec((), 4) == P()
    assert sharding.fsdp_spec((1280, 320), 1) == P()
    assert sharding.fsdp_spec((64, 64), 8) == P("fsdp", None)  # ties: the first


def test_make_mesh_and_batch_sharding_on_one_device():
    mesh = sharding.make_mesh(data=-1)
    assert mesh.axis_names == ("data", "fsdp") and mesh.shape == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="needs 2 devices, there are 1"):
        sharding.make_mesh(data=2, fsdp=1)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.make_mesh(data=-1, fsdp=-1)
    batch = sharding.host_batch_to_global(mesh, {"x": np.ones((4, 2), np.float32)})
    assert batch["x"].shape == (4, 2) and batch["x"].sharding.spec == P(("data", "fsdp"))
    shardings = sharding.param_shardings(mesh, {"w": jnp.ones((8, 8))})
    placed = sharding.put_global({"w": np.ones((8, 8))}, shardings)
    np.testing.assert_array_equal(sharding.to_host(placed)["w"], np.ones((8, 8)))
    sharding.barrier("single process: a no-op")


# ---------------------------------------------------------------------------------------------------------
# Latent cache, checkpoints, preemption, previews
# ---------------------------------------------------------------------------------------------------------

def test_cached_batches_follow_the_data_order_and_drop_captions():
    n = 10
    cache = latent_cache.LatentCache(mean=np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1),
                                     logvar=np.zeros((n, 1, 1, 1), np.float32),
                                     text=np.arange(n, dtype=np.float32).reshape(n, 1, 1) + 100,
                                     empty_text=np.full((1, 1), -1.0, np.float32))
    batches = latent_cache.cached_batches(cache, batch_size=4, seed=3, start_step=2, process_index=1,
                                          process_count=2, caption_dropout=0.5)
    batch = next(batches)
    order, _ = preprocess.global_indices(n, seed=3, step=2, global_batch_size=8)
    np.testing.assert_array_equal(batch["latent_mean"][:, 0, 0, 0], order[4:])
    context = batch["context"][:, 0, 0]
    dropped = context == -1  # dropped captions get the empty caption's row, the others their own
    np.testing.assert_array_equal(context[~dropped], order[4:][~dropped] + 100)
    many = [next(batches)["context"][:, 0, 0] for _ in range(20)]
    rate = np.mean([c == -1 for c in many])
    assert 0.3 < rate < 0.7
    with pytest.raises(ValueError, match="center_crop=True"):
        latent_cache.check_config(load_config("finetune_sd15").data)


def test_preemption_watcher_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    watcher = checkpoint.PreemptionWatcher()
    assert not watcher.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.should_stop()
    watcher.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_checkpointer_round_trip(tmp_path):
    state = {"step": jnp.array(3, jnp.int32), "params": {"unet": {"blocks": {0: {"w": jnp.arange(6.0)}}}}}
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=True)
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
        ckpt.save(step, state, {"step": step})
    ckpt.wait()
    mesh = sharding.make_mesh()
    target = checkpoint.abstract_with_shardings(state, sharding.param_shardings(mesh, state))
    restored, meta = ckpt.restore(target)
    assert ckpt.restore_readable(target)[1]["step"] == 3  # the same arrays under the same names
    # arrays of the same shapes under other names (a LoRA resumed with other targets): an error, nothing moved
    other = {"step": state["step"], "params": {"unet": {"blocks": {0: {"v": jnp.arange(6.0)}}}}}
    with pytest.raises(ValueError, match=r"different model .*first difference: params/unet/blocks/0/v: absent in "
                                         r"the checkpoint, \(6,\) here\): use another --config.workdir"):
        ckpt.restore_readable(checkpoint.abstract_with_shardings(other, sharding.param_shardings(mesh, other)))
    ckpt.close()
    assert meta["step"] == 3 and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    np.testing.assert_array_equal(restored["params"]["unet"]["blocks"][0]["w"], np.arange(6.0))


def test_preview_grid_tiles_images_and_checks_the_sampler():
    def sample_fn(modules, prompts, seed):
        return np.full((len(prompts), 4, 4, 3), seed, np.uint8)

    grid = training.preview_grid(sample_fn, {}, ["a", "b", "c"], 7)
    assert grid.shape == (8, 8, 3) and grid[:4, :4].min() == 7 and grid[4:, 4:].max() == 0
    with pytest.raises(ValueError, match="uint8"):
        training.preview_grid(lambda m, p, s: np.zeros((len(p), 4, 4, 3)), {}, ["a"], 0)


# ---------------------------------------------------------------------------------------------------------
# TFDS without TensorFlow, configs
# ---------------------------------------------------------------------------------------------------------

def test_tfds_needs_the_data_extra(monkeypatch, tmp_path):
    from sdjax.data import tfds

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed (it is not, here)
    with pytest.raises(ImportError, match=r"pip install 'sdjax\[data\]'"):
        tfds.TFDSDataset("my_images")
    with pytest.raises(ImportError, match=r"pip install 'sdjax\[data\]'"):
        tfds.folder_to_tfds(tmp_path, name="my_images")
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 0
    np.testing.assert_array_equal(tfds._to_rgb(rgba), np.full((2, 2, 3), 255))
    assert tfds._to_text(np.array(b"a cat", dtype=object)) == "a cat"


CONFIGS = ("train_base", "tiny", "finetune_sd15", "finetune_sd21", "train_autoencoder", "train_scratch", "lora_sd15",
           "lora_shapes")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load_and_document_their_launch_command(name):
    config = load_config(name)
    assert config.optimizer.name == "adamw" and config.stage in ("diffusion", "autoencoder")
    source = (ROOT / "configs" / f"{name}.py").read_text()
    docstring = source.split('"""')[1]
    assert "python train.py --config configs/" in docstring


def test_config_overrides_and_unknown_fields_on_the_command_line(tmp_path):
    base = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py")]
    bad = subprocess.run(base + [f"--config.workdir={tmp_path}", "--config.optimizer.learnig_rate=1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "learnig_rate" in bad.stderr
    missing = subprocess.run(base + ["--config.model.variant=nope", f"--config.workdir={tmp_path}"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "unknown model variant 'nope'" in missing.stderr
