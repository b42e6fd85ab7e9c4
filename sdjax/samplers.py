"""One function pair per sampler: its coefficient table (numpy, float64) and its step (jax).

Every sampler is a linear update of the current latents x, the model output and a few remembered past
outputs, with coefficients that depend only on the schedule. So each sampler is written as
  * `<name>_rows(sched, begin)`: the coefficients of every model call from call `begin` on, computed once in
    float64 from a `schedulers.Schedule` (this is where the math of the method is), and
  * `<name>_step(x, out, row, hist, noise, opts) -> (x, hist)`: the update for one model call in jax, reading
    its coefficients from `row` (one entry of each table) -- short enough to check against the paper.
`hist` is the sampler's memory (past outputs), `noise` a standard normal draw (stochastic samplers only)
and `opts` the static `Options`. The coefficients replicate diffusers' schedulers, quirks included.

Notation: a = alphas_cumprod[t]; for the sigma samplers x = x0 + sigma * eps (Karras et al. 2022); for
DPM-Solver and UniPC x = alpha * x0 + sigma_t * eps with alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha
and the log-SNR lambda = log(alpha / sigma_t).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import Schedule


class Options(NamedTuple):
    """Static (hashable) settings of a step function."""
    clip_range: float | None = None            # clip the x0 prediction to [-r, r] (clip_sample)
    threshold: tuple[float, float] | None = None   # dynamic thresholding (ratio, sample_max_value)
    history: int = 0                           # how many past outputs the sampler keeps


class Sampler(NamedTuple):
    rows: Callable[[Schedule, int], dict]
    step: Callable
    history: Callable  # (x, opts) -> initial hist


# ------------------------------------------------------------------------------------------------ helpers

def _stack(rows: list[dict]) -> dict:
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def _vp_x0(prediction_type: str, alpha: float, sigma_t: float) -> dict:
    """x0 = x0_from_x * x + x0_from_out * model_output, for latents x = alpha * x0 + sigma_t * eps."""
    if prediction_type == "epsilon":
        return dict(x0_from_x=1 / alpha, x0_from_out=-sigma_t / alpha)
    if prediction_type == "v_prediction":          # v = alpha * eps - sigma_t * x0
        return dict(x0_from_x=alpha, x0_from_out=-sigma_t)
    return dict(x0_from_x=0.0, x0_from_out=1.0)


def _sigma_x0(prediction_type: str, sigma: float) -> dict:
    """x0 = x0_from_x * x + x0_from_out * model_output for the sigma samplers, whose x = x0 + sigma * eps (the
    UNet sees and predicts for x / sqrt(1 + sigma^2), so v-prediction is taken at that scale)."""
    if prediction_type == "epsilon":
        return dict(x0_from_x=1.0, x0_from_out=-sigma)
    if prediction_type == "v_prediction":
        return dict(x0_from_x=1 / (sigma ** 2 + 1), x0_from_out=-sigma / np.sqrt(sigma ** 2 + 1))
    return dict(x0_from_x=0.0, x0_from_out=1.0)


def _dynamic_threshold(x0, ratio, max_value):
    """Imagen's dynamic thresholding: clip each sample to its `ratio` quantile of |x0| (at least 1) and rescale."""
    s = jnp.quantile(jnp.abs(x0.reshape(x0.shape[0], -1)), ratio, axis=1)
    s = jnp.clip(s, 1, max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def predict_x0(x, out, row, opts):
    """The clean latents x0 the model output `out` at latents `x` predicts, from the call's coefficients in `row`
    (its prediction type at its noise level), clipped or thresholded as the sampler's `opts` say: diffusers'
    `pred_original_sample`. Every sampler's row table has `x0_from_x` and `x0_from_out`."""
    x0 = row["x0_from_x"] * x + row["x0_from_out"] * out
    if opts.threshold is not None:
        return _dynamic_threshold(x0, *opts.threshold)
    if opts.clip_range is not None:
        return jnp.clip(x0, -opts.clip_range, opts.clip_range)
    return x0


def _push(buffer, value):
    """Append to a fixed-size history (oldest first), dropping the oldest."""
    return jnp.concatenate([buffer[1:], value[None]])


def _combine(weights, buffer):
    """sum_i weights[i] * buffer[i]."""
    return jnp.tensordot(weights, buffer, axes=1)


def _no_history(x, opts):
    return ()


def _buffer(x, opts):
    return jnp.zeros((opts.history,) + x.shape, x.dtype)


# ------------------------------------------------------------------------- DDPM / DDIM / PNDM (alpha tables)

def ddpm_rows(sched: Schedule, begin: int) -> dict:
    """Ancestral sampling from the posterior q(x_prev | x, x0) (Ho et al. 2020, eqs. 6-7)."""
    cfg, ts, ac = sched.config, sched.timesteps, sched.alphas_cumprod.astype(np.float64)
    rows = []
    for k in range(begin, len(ts)):
        a, a_prev = ac[ts[k]], (ac[ts[k + 1]] if k + 1 < len(ts) else 1.0)
        beta = 1 - a / a_prev                                   # this step's beta
        var = beta if cfg["variance_type"] == "fixed_large" else max((1 - a_prev) / (1 - a) * beta, 1e-20)
        rows.append(dict(_vp_x0(cfg["prediction_type"], np.sqrt(a), np.sqrt(1 - a)),
                         c_x0=np.sqrt(a_prev) * beta / (1 - a),
                         c_x=np.sqrt(1 - beta) * (1 - a_prev) / (1 - a),
                         std=np.sqrt(var) if ts[k] > 0 else 0.0))
    return _stack(rows)


def ddpm_step(x, out, r, hist, noise, opts):
    x0 = predict_x0(x, out, r, opts)
    return r["c_x0"] * x0 + r["c_x"] * x + r["std"] * noise, hist


def ddim_rows(sched: Schedule, begin: int) -> dict:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z."""
    cfg, ts, ac = sched.config, sched.timesteps, sched.alphas_cumprod.astype(np.float64)
    final = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    stride = cfg["num_train_timesteps"] // sched.num_inference_steps   # diffusers' prev timestep, any spacing
    rows = []
    with np.errstate(divide="ignore", invalid="ignore"):  # a = 0 at a zero-SNR t = T-1 (needs v_prediction)
        for k in range(begin, len(ts)):
            t, prev = ts[k], ts[k] - stride
            a, a_prev = ac[t], (ac[prev] if prev >= 0 else final)
            std = cfg["eta"] * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            # eps from the raw model output (diffusers ignores clipping here)
            e_x, e_out = {"epsilon": (0.0, 1.0), "v_prediction": (np.sqrt(1 - a), np.sqrt(a)),
                          "sample": (1 / np.sqrt(1 - a), -np.sqrt(a / (1 - a)))}[cfg["prediction_type"]]
            rows.append(dict(_vp_x0(cfg["prediction_type"], np.sqrt(a), np.sqrt(1 - a)), e_x=e_x, e_out=e_out,
                             c_x0=np.sqrt(a_prev), c_eps=np.sqrt(1 - a_prev - std ** 2), std=std))
    return _stack(rows)


def ddim_step(x, out, r, hist, noise, opts):
    x0 = predict_x0(x, out, r, opts)
    eps = r["e_x"] * x + r["e_out"] * out
    x = r["c_x0"] * x0 + r["c_eps"] * eps
    return (x if noise is None else x + r["std"] * noise), hist


_PLMS_WEIGHTS = {1: [1], 2: [-1 / 2, 3 / 2], 3: [5 / 12, -16 / 12, 23 / 12],
                 4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}   # Adams-Bashforth, oldest first


def pndm_rows(sched: Schedule, begin: int) -> dict:
    """Pseudo numerical methods (Liu et al. 2022): a DDIM-like transfer x_prev = c_s x - c_e eps', where eps' is
    a Runge-Kutta (PRK warm-up) or Adams-Bashforth (PLMS) combination of past eps, as diffusers orders them.

    Per call: which sample it starts from (`use_saved`: the one saved at the last step start), what it pushes
    onto the eps history `ets`, and the weights of eps' on (out, ets oldest..newest, RK accumulator). The step
    does not use x0; `x0_from_x` / `x0_from_out` give `predict_x0` the one each call's own output predicts at
    the timestep the UNet was given (diffusers' PNDMScheduler reports none)."""
    cfg, ts, ac = sched.config, sched.timesteps, sched.alphas_cumprod.astype(np.float64)
    stride = cfg["num_train_timesteps"] // sched.num_inference_steps
    n_prk = 0 if cfg["skip_prk_steps"] else 12   # 3 Runge-Kutta steps of 4 calls
    rows, n_ets = [], 0
    for c, k in enumerate(range(begin, len(ts))):   # c: diffusers' counter, from 0 at the first call of the run
        row = dict(push=False, save=False, use_saved=False, w_out=0.0, w_ets=np.zeros(4), w_acc=0.0,
                   acc_keep=1.0, acc_add=0.0)
        t = ts[k]
        with np.errstate(divide="ignore"):   # a = 0 at a zero-SNR t = T-1 (needs v_prediction)
            row.update(_vp_x0(cfg["prediction_type"], np.sqrt(ac[t]), np.sqrt(1 - ac[t])))
        if c < n_prk:   # RK4 stage c % 4; alphas of the step start ts[c//4*4] (full table, as diffusers)
            stage = c % 4
            prev, t = t - (0 if c % 2 else stride // 2), sched.timesteps[c // 4 * 4]
            row.update(use_saved=True, save=stage == 0, push=stage == 0)
            if stage == 3:                              # (k1 + 2 k2 + 2 k3 + k4) / 6
                row.update(w_out=1 / 6, w_acc=1.0, acc_keep=0.0)
            else:
                row.update(w_out=1.0, acc_add=1 / 6 if stage == 0 else 1 / 3, acc_keep=0.0 if stage == 0 else 1.0)
            n_ets += stage == 0
        elif c == 1 and n_prk == 0:                     # PLMS corrector: redo step 0 with the mean of both eps
            prev, t = t, t + stride
            row.update(use_saved=True, w_out=0.5)
            row["w_ets"][3] = 0.5
        else:                                           # PLMS predictor of order min(#eps, 4)
            prev = t - stride
            n_ets = min(n_ets + 1, 4)
            row.update(push=True, save=c == 0)
            row["w_ets"][4 - n_ets:] = _PLMS_WEIGHTS[n_ets]
        a, a_prev = ac[t], (ac[prev] if prev >= 0 else (1.0 if cfg["set_alpha_to_one"] else ac[0]))
        e_out, e_x = (np.sqrt(a), np.sqrt(1 - a)) if cfg["prediction_type"] == "v_prediction" else (1.0, 0.0)
        row.update(e_out=e_out, e_x=e_x, c_s=np.sqrt(a_prev / a),
                   c_e=(a_prev - a) / (a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev)))
        rows.append(row)
    return _stack(rows)


def pndm_step(x, out, r, hist, noise, opts):
    ets, acc, saved = hist
    ets = jnp.where(r["push"], _push(ets, out), ets)
    saved = jnp.where(r["save"], x, saved)
    sample = jnp.where(r["use_saved"], saved, x)
    eps = r["w_out"] * out + _combine(r["w_ets"], ets) + r["w_acc"] * acc
    eps = r["e_out"] * eps + r["e_x"] * sample                  # v-prediction -> eps
    acc = r["acc_keep"] * acc + r["acc_add"] * out
    return r["c_s"] * sample - r["c_e"] * eps, (ets, acc, saved)


def _pndm_history(x, opts):
    return jnp.zeros((4,) + x.shape, x.dtype), jnp.zeros_like(x), jnp.zeros_like(x)


# ------------------------------------------------------------------- sigma samplers: x = x0 + sigma * eps

def euler_rows(sched: Schedule, begin: int) -> dict:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 2):
    x_next = x + (x - x0) / sigma * (sigma_next - sigma), written as x0 + (sigma_next / sigma) (x - x0), which
    is the same step without the cancellation of two large terms when sigma is huge (zero-SNR schedules)."""
    s = sched.sigmas.astype(np.float64)
    return _stack([dict(_sigma_x0(sched.config["prediction_type"], s[k]), ratio=s[k + 1] / s[k])
                   for k in range(begin, len(s) - 1)])


def euler_step(x, out, r, hist, noise, opts):
    x0 = predict_x0(x, out, r, opts)
    return x0 + r["ratio"] * (x - x0), hist


def euler_ancestral_rows(sched: Schedule, begin: int) -> dict:
    """An Euler step down to sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 =
    sigma_next^2 (k-diffusion's sample_euler_ancestral, eta = 1)."""
    s, rows = sched.sigmas.astype(np.float64), []
    for k in range(begin, len(s) - 1):
        up = np.sqrt(s[k + 1] ** 2 * (s[k] ** 2 - s[k + 1] ** 2) / s[k] ** 2)
        down = np.sqrt(s[k + 1] ** 2 - up ** 2)
        rows.append(dict(_sigma_x0(sched.config["prediction_type"], s[k]), ratio=down / s[k], sigma_up=up))
    return _stack(rows)


def euler_ancestral_step(x, out, r, hist, noise, opts):
    x0 = predict_x0(x, out, r, opts)
    return x0 + r["ratio"] * (x - x0) + r["sigma_up"] * noise, hist


def heun_rows(sched: Schedule, begin: int) -> dict:
    """Heun's method (Karras et al. 2022, Alg. 1): an Euler step to sigma_next, then a corrector call there
    averaging both slopes. The calls alternate (first, second); the last step is Euler only (sigma_next = 0)."""
    s, rows = sched.sigmas.astype(np.float64), []
    for k in range(begin, len(s) - 1):
        first = (k - begin) % 2 == 0
        dt = s[k + 1] - s[k] if first else s[k] - s[k - 1]
        rows.append(dict(_sigma_x0(sched.config["prediction_type"], s[k]), sigma=s[k], dt=dt, first=first))
    return _stack(rows)


def heun_step(x, out, r, hist, noise, opts):
    d_first, x_first = hist
    d = (x - predict_x0(x, out, r, opts)) / r["sigma"]
    x_next = jnp.where(r["first"], x + d * r["dt"], x_first + (d_first + d) / 2 * r["dt"])
    return x_next, (jnp.where(r["first"], d, d_first), jnp.where(r["first"], x, x_first))


def _heun_history(x, opts):
    return jnp.zeros_like(x), jnp.zeros_like(x)


def lms_rows(sched: Schedule, begin: int) -> dict:
    """Linear multistep: x_next = x + sum_i c_i d_i over the last (up to 4) slopes d = (x - x0) / sigma, where
    c_i integrates the Lagrange basis polynomial of sigma_{k-i} from sigma_k to sigma_{k+1}.

    As in diffusers the order is min(k + 1, 4) with k the absolute step index, also when an img2img run
    starts at k > 0 with fewer remembered slopes (the missing ones count as zero)."""
    s, rows = sched.sigmas.astype(np.float64), []
    P = np.polynomial.Polynomial
    for k in range(begin, len(s) - 1):
        order, c = min(k + 1, 4), np.zeros(4)     # c[3] weighs the newest slope
        for i in range(order):
            basis = P([1.0])
            for m in range(order):
                if m != i:
                    basis *= P([-s[k - m], 1.0]) / (s[k - i] - s[k - m])
            antiderivative = basis.integ()
            c[3 - i] = antiderivative(s[k + 1]) - antiderivative(s[k])
        rows.append(dict(_sigma_x0(sched.config["prediction_type"], s[k]), sigma=s[k], c=c))
    return _stack(rows)


def lms_step(x, out, r, hist, noise, opts):
    hist = _push(hist, (x - predict_x0(x, out, r, opts)) / r["sigma"])
    return x + _combine(r["c"], hist), hist


# ---------------------------------------------------- DPM-Solver++ and UniPC: x = alpha x0 + sigma_t eps

def _vp(sigma):
    """alpha, sigma_t, lambda for x = alpha x0 + sigma_t eps at noise level sigma (lambda = +inf at sigma = 0)."""
    alpha = 1 / np.sqrt(sigma ** 2 + 1)
    with np.errstate(divide="ignore"):
        return alpha, sigma * alpha, np.log(alpha) - np.log(sigma * alpha)


def _multistep_x0(sched: Schedule, sigma: float) -> dict:
    alpha, sigma_t, _ = _vp(sigma)
    return _vp_x0(sched.config["prediction_type"], alpha, sigma_t)


def _dpm_phi(h, sde):
    """Weights (per unit alpha) of D1 in the "heun" / third-order update and of D2 in the third-order one."""
    if sde:
        e = np.exp(-2 * h)
        return (1 - e) / (-2 * h) + 1, (1 - e - 2 * h) / (2 * h) ** 2 - 0.5
    e = np.exp(-h)
    return (e - 1) / h + 1, -((e - 1 + h) / h ** 2 - 0.5)


def dpm_solver_rows(sched: Schedule, begin: int) -> dict:
    """DPM-Solver++ multistep (Lu et al. 2022, Alg. 2) and its SDE variant, on data predictions m_k = x0:
        x_next = c_x x + a0 D0 + a1 D1 + a2 D2 (+ c_z z),   D0 = m_k, D1 and D2 divided differences of m,
    with h = lambda_{k+1} - lambda_k. The table holds c_x, c_z and a0 D0 + a1 D1 + a2 D2 as weights on the
    history (m_{k-2}, m_{k-1}, m_k). Order: 1 at the first call of a run and (lower_order_final) at the end,
    else up to `solver_order`."""
    cfg, s = sched.config, sched.sigmas.astype(np.float64)
    N, order_max, sde = len(sched.timesteps), cfg["solver_order"], cfg["algorithm_type"] == "sde-dpmsolver++"
    alpha, sigma_t, lam = _vp(s)
    rows = []
    for j, k in enumerate(range(begin, N)):
        last = k == N - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and N < 15)
                               or cfg["final_sigmas_type"] == "zero")
        second_last = k == N - 2 and cfg["lower_order_final"] and N < 15
        remembered = min(j, order_max)              # outputs of earlier calls of this run
        order = 1 if (order_max == 1 or remembered < 1 or last) else (
            2 if (order_max == 2 or remembered < 2 or second_last) else 3)
        h, a = lam[k + 1] - lam[k], alpha[k + 1]
        if sde:    # noise re-injected: the deterministic part decays by e^-h more, z fills the variance back
            c_x, c_z = sigma_t[k + 1] / sigma_t[k] * np.exp(-h), sigma_t[k + 1] * np.sqrt(1 - np.exp(-2 * h))
            a0 = a * (1 - np.exp(-2 * h))
        else:
            c_x, c_z, a0 = sigma_t[k + 1] / sigma_t[k], 0.0, -a * (np.exp(-h) - 1)
        w = np.array([a0, 0.0, 0.0])               # on (m_k, m_{k-1}, m_{k-2})
        if order == 2:
            r0 = (lam[k] - lam[k - 1]) / h
            a1 = 0.5 * a0 if cfg["solver_type"] == "midpoint" else a * _dpm_phi(h, sde)[0]
            w += a1 * np.array([1.0, -1.0, 0.0]) / r0
        elif order == 3:
            r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
            D1_0, D1_1 = np.array([1.0, -1.0, 0.0]) / r0, np.array([0.0, 1.0, -1.0]) / r1
            D1, D2 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1), (D1_0 - D1_1) / (r0 + r1)
            phi1, phi2 = _dpm_phi(h, sde)
            w += a * phi1 * D1 + a * phi2 * D2
        rows.append(dict(_multistep_x0(sched, s[k]), c_x=c_x, c_z=c_z, w=w[:order_max][::-1].copy()))
    return _stack(rows)


def dpm_solver_step(x, out, r, hist, noise, opts):
    hist = _push(hist, predict_x0(x, out, r, opts))
    x = r["c_x"] * x + _combine(r["w"], hist)
    return (x if noise is None else x + r["c_z"] * noise), hist


def _unipc_rhos(h, rks, order, solver_type, corrector):
    """UniPC's B(h), h*phi_1(h) and weights rho (Zhao et al. 2023, Alg. 1-2 with B(h) of type bh1/bh2)."""
    hh = -h                                       # data prediction (predict_x0)
    h_phi_1 = np.expm1(hh)
    B_h = hh if solver_type == "bh1" else np.expm1(hh)
    R, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        R.append(np.power(rks, i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(R), np.array(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    else:
        rhos = np.array([]) if order == 1 else np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    return h_phi_1, B_h, rhos


def unipc_rows(sched: Schedule, begin: int) -> dict:
    """UniPC (Zhao et al. 2023), bh1/bh2, data prediction: after each model call a corrector (UniC) redoes the
    previous step with the new output, then a predictor (UniP) takes the next step. Both are linear in the
    history of data predictions m (oldest first, m_k newest): the table holds their weights."""
    cfg, s = sched.config, sched.sigmas.astype(np.float64)
    N, order_max = len(sched.timesteps), cfg["solver_order"]
    alpha, sigma_t, lam = _vp(s)
    rows, prev_order = [], 1
    for j, k in enumerate(range(begin, N)):
        use_corrector = j > 0 and k > 0 and k - 1 not in cfg["disable_corrector"]
        row = dict(_multistep_x0(sched, s[k]), use_corrector=use_corrector, c_last=0.0, c_new=0.0,
                   c_hist=np.zeros(order_max))
        with np.errstate(divide="ignore", invalid="ignore"):
            if row["use_corrector"]:   # redo the step k-1 -> k with the order used for it
                order, h = prev_order, lam[k] - lam[k - 1]
                rks = np.array([(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, order)] + [1.0])
                h_phi_1, B_h, rhos = _unipc_rhos(h, rks, order, cfg["solver_type"], corrector=True)
                g = alpha[k] * B_h
                row["c_last"], row["c_new"] = sigma_t[k] / sigma_t[k - 1], -g * rhos[-1]
                row["c_hist"][-1] = -alpha[k] * h_phi_1 + g * rhos[-1] + g * np.sum(rhos[:-1] / rks[:-1])
                for i in range(1, order):
                    row["c_hist"][-1 - i] = -g * rhos[i - 1] / rks[i - 1]
            order = min(order_max, N - k) if cfg["lower_order_final"] else order_max
            order = min(order, min(j, order_max) + 1)
            h = lam[k + 1] - lam[k]
            rks = np.array([(lam[k - i] - lam[k]) / h for i in range(1, order)] + [1.0])
            h_phi_1, B_h, rhos = _unipc_rhos(h, rks, order, cfg["solver_type"], corrector=False)
            g, p_hist = alpha[k + 1] * B_h, np.zeros(order_max)
            p_hist[-1] = -alpha[k + 1] * h_phi_1 + (g * np.sum(rhos / rks[:-1]) if order > 1 else 0.0)
            for i in range(1, order):
                p_hist[-1 - i] = -g * rhos[i - 1] / rks[i - 1]
        row.update(p_x=sigma_t[k + 1] / sigma_t[k], p_hist=p_hist)
        rows.append(row)
        prev_order = order
    return _stack(rows)


def unipc_step(x, out, r, hist, noise, opts):
    ms, x_last = hist
    m = predict_x0(x, out, r, opts)
    corrected = r["c_last"] * x_last + r["c_new"] * m + _combine(r["c_hist"], ms)
    x = jnp.where(r["use_corrector"], corrected, x)
    ms = _push(ms, m)
    return r["p_x"] * x + _combine(r["p_hist"], ms), (ms, x)


def _unipc_history(x, opts):
    return _buffer(x, opts), jnp.zeros_like(x)


SAMPLERS = {
    "DDPMScheduler": Sampler(ddpm_rows, ddpm_step, _no_history),
    "DDIMScheduler": Sampler(ddim_rows, ddim_step, _no_history),
    "PNDMScheduler": Sampler(pndm_rows, pndm_step, _pndm_history),
    "LMSDiscreteScheduler": Sampler(lms_rows, lms_step, _buffer),
    "EulerDiscreteScheduler": Sampler(euler_rows, euler_step, _no_history),
    "EulerAncestralDiscreteScheduler": Sampler(euler_ancestral_rows, euler_ancestral_step, _no_history),
    "HeunDiscreteScheduler": Sampler(heun_rows, heun_step, _heun_history),
    "DPMSolverMultistepScheduler": Sampler(dpm_solver_rows, dpm_solver_step, _buffer),
    "UniPCMultistepScheduler": Sampler(unipc_rows, unipc_step, _unipc_history),
}


def options(config: dict) -> Options:
    """The static step options of an effective config (see `schedulers.scheduler_config_for`)."""
    cls = config["_class_name"]
    threshold = ((config["dynamic_thresholding_ratio"], config["sample_max_value"])
                 if config.get("thresholding") else None)
    clip = config["clip_sample_range"] if config.get("clip_sample") else None
    history = {"LMSDiscreteScheduler": 4, "DPMSolverMultistepScheduler": config.get("solver_order", 0),
               "UniPCMultistepScheduler": config.get("solver_order", 0)}.get(cls, 0)
    return Options(clip_range=clip, threshold=threshold, history=history)


def is_stochastic(config: dict) -> bool:
    """Whether the sampler draws fresh noise each step (and so needs an rng)."""
    cls = config["_class_name"]
    return (cls in ("DDPMScheduler", "EulerAncestralDiscreteScheduler")
            or (cls == "DDIMScheduler" and config["eta"] > 0)
            or (cls == "DPMSolverMultistepScheduler" and config["algorithm_type"] == "sde-dpmsolver++"))
