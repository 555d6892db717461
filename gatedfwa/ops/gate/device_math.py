"""The sharpened gate (the default) as Triton device functions, and the exp and log1p they
and other gates' device functions are built from.

    beta = 1 + ELU(beta_pre),   g = logsigmoid(beta * a) / beta = min(a, 0) - log1p(exp(-beta |a|)) / beta

The kernels (kernels.py, chunk_sums.py) receive log_gate and log_gate_derivatives through the
gate's GateSpec (kinds/sharpened.py) as constexpr arguments and inline them.

exp and log1p are built here from operations whose accuracy does not depend on the
argument's size, because the GPU's fast exp (exp2 of x * log2(e)) loses about |x| * 6e-8
relative accuracy: 3e-6 at x = -50, far more than the reference's one rounding.
"""

from __future__ import annotations

# Triton is optional: without it these functions are defined but never compiled.
from gatedfwa.ops.common.triton_support import LOG2E_CONSTEXPR as LOG2E
from gatedfwa.ops.common.triton_support import constexpr, jit, tl

__all__ = ["exp_nonpositive", "log1p_unit", "gate_terms", "log_gate", "log_gate_derivatives"]

# ln(2) split so that n * LN2_HI is exact in float32 for |n| < 2^9 (LN2_HI has 15 bits).
LN2_HI = constexpr(0.693145751953125)
LN2_LO = constexpr(1.4286067653302720e-06)


@jit
def exp_nonpositive(x):
    """exp(x) for x <= 0 within about one ulp for any x (0 below ~ -104, like float32 itself).

    exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, with exp(r) from its Taylor
    series to r^9/9! (the rest is < 3e-10 relative). Neither the hardware exp (exp2 of
    x log2(e), whose error grows with |x|) nor Triton's interpreter exp (numpy, up to 1.6 ulp)
    is involved, so GPU and CPU runs round alike. 2^n is assembled from exponent bits in two
    factors so that n below -126 underflows gradually.
    """
    x = tl.maximum(x, -170.0)
    n = tl.floor(x * LOG2E + 0.5)
    r = (x - n * LN2_HI) - n * LN2_LO
    series = 1.0 / 362880.0
    series = series * r + 1.0 / 40320.0
    series = series * r + 1.0 / 5040.0
    series = series * r + 1.0 / 720.0
    series = series * r + 1.0 / 120.0
    series = series * r + 1.0 / 24.0
    series = series * r + 1.0 / 6.0
    series = series * r + 0.5
    series = series * r + 1.0
    exp_r = series * r + 1.0
    n_int = n.to(tl.int32)
    n_first = tl.maximum(n_int, -126)
    n_second = n_int - n_first
    scale_first = ((n_first + 127) << 23).to(tl.float32, bitcast=True)
    scale_second = ((n_second + 127) << 23).to(tl.float32, bitcast=True)
    return exp_r * scale_first * scale_second


@jit
def log1p_unit(e):
    """log(1 + e) for 0 <= e <= 1, within about one ulp, relative accuracy kept for tiny e.

    log(1 + e) = 2 atanh(s) = 2s + 2s^3 (1/3 + s^2/5 + ... + s^14/17), s = e / (2 + e) <= 1/3
    (the first omitted term is < 2e-10 relative). Since 2s = e - e s exactly, this is
    e - s (e - 2 s^2 Q): the exact e leads and the rounding of s only touches the smaller
    correction term.
    """
    s = e / (2.0 + e)
    s2 = s * s
    series = 1.0 / 17.0
    series = series * s2 + 1.0 / 15.0
    series = series * s2 + 1.0 / 13.0
    series = series * s2 + 1.0 / 11.0
    series = series * s2 + 1.0 / 9.0
    series = series * s2 + 1.0 / 7.0
    series = series * s2 + 1.0 / 5.0
    series = series * s2 + 1.0 / 3.0
    return e - s * (e - 2.0 * s2 * series)


@jit
def gate_terms(a, beta_pre):
    """Shared by forward and backward (float32 blocks): beta, |z| = beta |a|, e = exp(-|z|)
    and log1p(e)."""
    beta = tl.where(beta_pre > 0, 1.0 + beta_pre, exp_nonpositive(tl.minimum(beta_pre, 0.0)))
    z_abs = beta * tl.abs(a)
    e = exp_nonpositive(-z_abs)
    return beta, z_abs, e, log1p_unit(e)


@jit
def log_gate(a, beta_pre):
    """g = logsigmoid(beta a) / beta for float32 blocks, with z / beta = a taken exactly
    (no round trip through z = beta a)."""
    beta, z_abs, e, log1p_e = gate_terms(a, beta_pre)
    return tl.minimum(a, 0.0) - log1p_e / beta



@jit
def log_gate_derivatives(a, beta_pre):
    """(dg/da, dg/dbeta_pre) for float32 blocks: dg/da = sigmoid(-z), dg/dbeta_pre =
    h(z) beta'(beta_pre) / beta^2 with h(z) = log1p(e) + |z| e / (1 + e) (kinds/sharpened.py)."""
    beta, z_abs, e, log1p_e = gate_terms(a, beta_pre)
    # One reciprocal serves both sigmoid(-z) and h.
    e_over = e / (1.0 + e)
    # sigmoid(-z): e / (1 + e) when z >= 0, 1 / (1 + e) = 1 - e / (1 + e) when z < 0 (the sign
    # of z is a's); 1 - e/(1+e) >= 1/2 there, so the subtraction loses nothing.
    da_factor = tl.where(a >= 0, e_over, 1.0 - e_over)
    h = log1p_e + z_abs * e_over
    inv_beta = 1.0 / beta
    # beta' = 1 for beta_pre > 0 (beta >= 1), beta' = beta otherwise: 1/beta^2 is never formed
    # for small beta, where it would overflow float32.
    dbeta_factor = h * inv_beta * tl.where(beta_pre > 0, inv_beta, 1.0)
    return da_factor, dbeta_factor
