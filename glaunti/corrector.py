"""The convolutional corrector of GlaUnTI (models C and D, docs/model.md §4).

Once per balance year it maps 15 per-cell input channels (C=15, H×W) and the monthly
climate series (2, M) to five per-cell corrections d1..d5 (5, H, W).

Module and field names mirror the leaf paths of the published parameter files
(``branch_2d.downs[i].block.block1.conv.weight`` …) so that the authors' files load by tree
order. Pooling and activations are plain functions: they carry no leaves, as in the
published tree.

Conventions, established by matching the golden fixtures bit-for-bit where possible:
- convolutions are ``equinox.nn.Conv{1,2}d``; 3×3 and width-3 convs use 'SAME' zero
  padding (one zero on each side);
- the RMS normalisation is per channel over the spatial (or time) axes,
  ``x / sqrt(mean(x·x) + 1e-6) · weight + bias`` (no centring), in exactly this order of
  operations (see :class:`RMSNorm`);
- the activation is swish (``jax.nn.swish``);
- max-pool 2×2 stride 2 and average-pool 2 stride 2 (Equinox's pools) drop a trailing odd
  row/column;
- the final upsampling is ``jax.image.resize(..., 'bilinear', antialias=False)``.

Padded grids. So that one compiled function serves every glacier of a shape bucket, the
corrector also runs on a grid padded at the bottom/right to a stored shape (Hp, Wp) given the
true size (H, W) (``grid_size``, possibly traced). The padded cells then hold zeros before every
convolution (so the 'SAME' padding sees zeros beyond the true border, as on the true grid), the
RMS norms average over true cells only, each pooling level tracks its true size
(⌊h/2⌋ × ⌊w/2⌋), and the upsampling is jax.image.resize's bilinear weights built from the
traced sizes (:func:`resize_bilinear_padded`). The true block of the output then equals the
unpadded call to float32 rounding (the norms' sums run in another order), the rest is 0, and the
padded cells' values reach neither the output nor the gradient.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import constants

# Input fields: the TI channels the model computes (docs/model.md §4), then the given ones:
# outlines, elevation, elevation std and the facies bands.
N_COMPUTED_CHANNELS = 3
N_GIVEN_FIELDS = 3 + len(constants.facies_bands)
N_FIELDS = N_COMPUTED_CHANNELS + N_GIVEN_FIELDS
N_CLIMATE = 2  # monthly T, P
N_OUT = 5  # d1..d5
WIDTH_2D = 32
WIDTH_1D = 8
N_DOWN = 3
N_1D_STAGES = 2
OUT_SCALE = 0.1
RMS_EPS = 1e-6
# The monthly series covers 12–14 (partial) months (docs/model.md §9.6).
MONTH_COUNTS = (12, 13, 14)
# jax.image.resize's threshold below which a column of weights is treated as empty.
_RESIZE_WEIGHT_FLOOR = 1000.0 * float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------------------------
# Convolutions in the training loss
# ----------------------------------------------------------------------------------------------
# XLA's CPU backend hands a convolution to Eigen only once it has rewritten it channels-last,
# and it does that rewrite in a jitted function's top level only. Inside the year scan of our
# training loss (and for the convolutions that autodiff derives for its backward pass) it falls
# back to a plain loop nest: ~7× slower, and its float32 sums run in another order than the
# published code's, which calls the corrector at the top level of a per-year jitted function.
# In the training losses the convolutions are therefore written channels-last, forward and
# backward (``channels_last=True``, an argument of every corrector call): bit for bit what XLA
# computes at the top level.


def _conv_last_plain(x, w, padding):
    """Stride-1 convolution, x (1, *S, I), w (*K, I, O), explicit padding → (1, *S', O)."""
    n = x.ndim - 2
    spec = ("NWC", "WIO", "NWC") if n == 1 else ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, w, (1,) * n, padding, dimension_numbers=spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_last(x, w, padding):
    return _conv_last_plain(x, w, padding)


def _conv_last_fwd(x, w, padding):
    return _conv_last_plain(x, w, padding), (x, w)


def _conv_last_bwd(padding, res, g):
    x, w = res
    n = x.ndim - 2
    kernel = w.shape[:n]
    # Input gradient: the output gradient convolved with the kernel turned 180° (I ↔ O).
    flipped = jnp.swapaxes(w[(slice(None, None, -1),) * n], -1, -2)
    dx = _conv_last_plain(g, flipped, tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel, padding)))
    # Kernel gradient: input channels as the batch, the output gradient as the kernel.
    spatial = tuple(range(1, n + 1))
    lhs = jnp.transpose(x, (n + 1,) + spatial + (0,))  # (I, *S, 1)
    rhs = jnp.transpose(g, spatial + (0, n + 1))  # (*S', 1, O)
    dw = _conv_last_plain(lhs, rhs, padding)  # (I, *K, O)
    dw = jnp.transpose(dw, spatial + (0, n + 1))
    return dx, dw


_conv_last.defvjp(_conv_last_fwd, _conv_last_bwd)


def conv(module: eqx.nn.Conv, x: Float[Array, "C ..."], channels_last: bool = False) -> Float[Array, "O ..."]:
    """``module(x)`` for an unbatched channels-first ``x``; with ``channels_last`` computed
    channels-last with a hand-written reverse-mode derivative (the published CPU numbers inside
    loops too, and no forward-mode derivative: training losses only)."""
    if not channels_last:
        return module(x)
    n = module.num_spatial_dims
    if module.stride != (1,) * n or module.dilation != (1,) * n or module.groups != 1:
        raise ValueError("the corrector's convolutions have stride 1, dilation 1, one group")
    padding = module.padding
    if isinstance(padding, str):  # 'SAME' of an odd kernel at stride 1
        padding = tuple((k // 2, k // 2) for k in module.kernel_size)
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    x_last = jnp.moveaxis(x, 0, -1)[None]
    w_last = jnp.moveaxis(module.weight, (0, 1), (-1, -2))  # (O, I, *K) → (*K, I, O)
    y = jnp.moveaxis(_conv_last(x_last, w_last, padding)[0], -1, 0)
    return y + module.bias if module.use_bias else y


class RMSNorm(eqx.Module):
    """Per-channel RMS normalisation over all non-channel axes, learned scale and offset
    (``weight`` and ``bias`` are (C, 1, …): one value per channel, broadcast over the rest)."""

    weight: Float[Array, "C ..."]
    bias: Float[Array, "C ..."]

    def __init__(self, channels: int, spatial_dims: int):
        shape = (channels,) + (1,) * spatial_dims
        self.weight = jnp.ones(shape, jnp.float32)
        self.bias = jnp.zeros(shape, jnp.float32)

    def __call__(
        self, x: Float[Array, "C ..."], mask: Bool[Array, "..."] | None = None
    ) -> Float[Array, "C ..."]:
        """``mask`` (the non-channel shape) restricts the mean to the true cells of a padded
        grid (their count, not the array size, divides the sum)."""
        # The published op order (x·x, mean, + ε, sqrt, divide, then scale and shift), not the
        # equal x·rsqrt(m + ε): where the bottleneck normalises one or two cells the output is
        # nearly x/|x| and the gradient through it is float32 rounding of two nearly equal
        # terms, which the two forms round differently (3e-3 relative on the tiny dataset) and
        # Adam turns into learning-rate-sized steps (tests/test_training_reproduction.py).
        axes = tuple(range(1, x.ndim))
        rms = jnp.sqrt(jnp.mean(x * x, axis=axes, keepdims=True, where=mask) + RMS_EPS)
        return (x / rms) * self.weight + self.bias


class ConvBlock(eqx.Module):
    """conv (no bias, 'SAME') → RMSNorm → swish."""

    conv: eqx.nn.Conv
    norm: RMSNorm

    def __init__(self, channels: int, spatial_dims: int, key: PRNGKeyArray):
        self.conv = eqx.nn.Conv(
            spatial_dims, channels, channels, 3, padding="SAME", use_bias=False, key=key
        )
        self.norm = RMSNorm(channels, spatial_dims)

    def __call__(self, x, mask: Bool[Array, "..."] | None = None, channels_last: bool = False):
        """With ``mask`` (padded grid; ``x`` zero outside it) the output is zeroed outside the
        mask again, ready for the next 'SAME' convolution. ``channels_last``: :func:`conv`."""
        if mask is None:
            return jax.nn.swish(self.norm(conv(self.conv, x, channels_last)))
        return jnp.where(mask, jax.nn.swish(self.norm(conv(self.conv, x, channels_last), mask)), 0.0)


class DoubleBlock(eqx.Module):
    """Two :class:`ConvBlock` in sequence."""

    block1: ConvBlock
    block2: ConvBlock

    def __init__(self, channels: int, spatial_dims: int, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.block1 = ConvBlock(channels, spatial_dims, k1)
        self.block2 = ConvBlock(channels, spatial_dims, k2)

    def __call__(self, x, mask: Bool[Array, "..."] | None = None, channels_last: bool = False):
        return self.block2(self.block1(x, mask, channels_last), mask, channels_last)


class Down(eqx.Module):
    """One 2-D stage: a :class:`DoubleBlock`, then a 2×2 max-pool (a function: no leaves)."""

    block: DoubleBlock

    def __init__(self, channels: int, key: PRNGKeyArray):
        self.block = DoubleBlock(channels, 2, key)

    def __call__(self, x: Float[Array, "C H W"], channels_last: bool = False) -> Float[Array, "C H//2 W//2"]:
        return max_pool_2x2(self.block(x, channels_last=channels_last))


def max_pool_2x2(x: Float[Array, "C H W"]) -> Float[Array, "C H//2 W//2"]:
    """2×2 max-pool, stride 2, no padding (a trailing odd row/column is dropped)."""
    return eqx.nn.MaxPool2d(kernel_size=2, stride=2)(x)


def grid_mask(size: Int[Array, "2"], shape: tuple[int, int]) -> Bool[Array, "Hp Wp"]:
    """True on the top-left ``size`` = (h, w) block of an array of static ``shape``."""
    rows = jnp.arange(shape[0]) < size[0]
    cols = jnp.arange(shape[1]) < size[1]
    return rows[:, None] & cols[None, :]


def avg_pool_2(x: Float[Array, "C T"]) -> Float[Array, "C T//2"]:
    """Average-pool of width 2, stride 2, no padding (the window sum divided by 2)."""
    return eqx.nn.AvgPool1d(kernel_size=2, stride=2)(x)


class Branch2D(eqx.Module):
    """(15, H, W) → (32, H/8, W/8): 1×1 conv, three [2 blocks + max-pool], bottleneck."""

    in_conv: eqx.nn.Conv2d
    downs: list[Down]
    bottleneck: DoubleBlock

    def __init__(self, key: PRNGKeyArray):
        # Key order of the authors' construction (in_conv, downs, bottleneck): with it, the
        # same seed gives their initial parameters leaf for leaf.
        k_in, *k_downs, k_b = jr.split(key, 2 + N_DOWN)
        self.in_conv = eqx.nn.Conv2d(N_FIELDS, WIDTH_2D, 1, use_bias=False, key=k_in)
        self.downs = [Down(WIDTH_2D, k) for k in k_downs]
        self.bottleneck = DoubleBlock(WIDTH_2D, 2, k_b)

    def __call__(
        self, x: Float[Array, "15 H W"], grid_size: Int[Array, "2"] | None = None, channels_last: bool = False
    ) -> Float[Array, "32 H//8 W//8"]:
        """With ``grid_size`` = (h, w), ``x`` is a padded grid whose true cells are its
        top-left h×w block; the output's true block is then (h//8, w//8), zero elsewhere."""
        if grid_size is None:
            x = conv(self.in_conv, x, channels_last)
            for down in self.downs:
                x = down(x, channels_last)
            return self.bottleneck(x, channels_last=channels_last)
        mask = grid_mask(grid_size, x.shape[1:])
        x = conv(self.in_conv, jnp.where(mask, x, 0.0), channels_last)  # 1×1, no bias: zero stays zero
        for down in self.downs:
            # The 2×2 pool keeps ⌊h/2⌋ × ⌊w/2⌋ true cells (it drops a trailing odd row/column).
            grid_size = grid_size // 2
            x = max_pool_2x2(down.block(x, mask, channels_last))
            mask = grid_mask(grid_size, x.shape[1:])
            x = jnp.where(mask, x, 0.0)
        return self.bottleneck(x, mask, channels_last)


class Branch1D(eqx.Module):
    """(2, M) → (8, 1): 1-wide conv, two [2 width-3 blocks + avg-pool], mean over time."""

    in_conv: eqx.nn.Conv1d
    conv_blocks: list[DoubleBlock]

    def __init__(self, key: PRNGKeyArray):
        k_in, *k_blocks = jr.split(key, 1 + N_1D_STAGES)
        self.in_conv = eqx.nn.Conv1d(N_CLIMATE, WIDTH_1D, 1, use_bias=False, key=k_in)
        self.conv_blocks = [DoubleBlock(WIDTH_1D, 1, k) for k in k_blocks]

    def __call__(self, x: Float[Array, "2 M"], channels_last: bool = False) -> Float[Array, "8 1"]:
        x = conv(self.in_conv, x, channels_last)
        for blocks in self.conv_blocks:
            x = avg_pool_2(blocks(x, channels_last=channels_last))
        return jnp.mean(x, axis=1, keepdims=True)


def check_grid(height: int, width: int) -> None:
    """Refuse grids the three 2×2 poolings cannot handle (docs/model.md §9.9)."""
    side = constants.min_grid_side
    if height < side or width < side:
        raise ValueError(
            f"the corrector needs a grid of at least {side}×{side} cells (three 2×2 "
            f"poolings); got H×W = {height}×{width}"
        )


def bilinear_weights(
    in_size: Int[Array, ""], out_size: Int[Array, ""], in_len: int, out_len: int
) -> Float[Array, "in_len out_len"]:
    """jax.image.resize's bilinear (antialias=False) interpolation weights from ``in_size`` to
    ``out_size`` samples (both possibly traced), padded with zero rows/columns to the static
    (``in_len``, ``out_len``).

    The float32 formula of jax's ``compute_weight_mat`` (jax/_src/image/scale.py): sample
    positions ``(i + 0.5)·(in/out) − 0.5``, the triangle kernel, each column divided by its sum,
    columns sampling outside the input zeroed. (jax rounds ``1/(out/in)`` from float64 to float32;
    ``in/out`` in float32 is the same number: both are the correctly rounded ratio, which for
    small integers is never near a float32 tie; tests/test_corrector_padding.py checks every
    size up to 1024.) Upsampling, a column has at most two non-zero
    weights, so the zero rows change no sum.
    """
    inv_scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    sample = (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * inv_scale - 0.5
    source = jnp.arange(in_len, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample[None, :] - source[:, None]))
    weights = jnp.where((jnp.arange(in_len) < in_size)[:, None], weights, 0.0)
    total = jnp.sum(weights, axis=0, keepdims=True)
    weights = jnp.where(
        jnp.abs(total) > _RESIZE_WEIGHT_FLOOR,
        weights / jnp.where(total != 0, total, 1.0),
        0.0,
    )
    inside = (sample >= -0.5) & (sample <= in_size.astype(jnp.float32) - 0.5)
    inside = inside & (jnp.arange(out_len) < out_size)
    return jnp.where(inside[None, :], weights, 0.0)


def resize_bilinear_padded(
    x: Float[Array, "C hp wp"],
    in_size: Int[Array, "2"],
    out_size: Int[Array, "2"],
    out_shape: tuple[int, int],
) -> Float[Array, "C Hp Wp"]:
    """``jax.image.resize(x[:, :h, :w], (C, H, W), "bilinear", antialias=False)`` for traced
    ``in_size`` = (h, w) and ``out_size`` = (H, W), in the top-left of a zero (C, ``out_shape``)
    array.

    The same weights (:func:`bilinear_weights`) as two contractions at the highest precision.
    Equal to jax's to float32 rounding, not bit for bit: jax orders the two contractions by
    opt_einsum's flop count of the true sizes, and XLA compiles the weights' arithmetic (a
    division by the column sum becomes a multiplication by its reciprocal, the sample positions
    are recomputed in several fused loops) into roundings that differ by an ulp from one
    compiled function to another.
    """
    hp, wp = x.shape[1:]
    rows = bilinear_weights(in_size[0], out_size[0], hp, out_shape[0])
    cols = bilinear_weights(in_size[1], out_size[1], wp, out_shape[1])
    highest = jax.lax.Precision.HIGHEST
    x = jnp.einsum("chw,hH->cHw", x, rows, precision=highest)
    return jnp.einsum("cHw,wW->cHW", x, cols, precision=highest)


def _check_grid_size(grid_size: Int[Array, "2"], height: int, width: int) -> None:
    """Shape check of a padded call's ``grid_size``; its values too when they are concrete.

    A traced ``grid_size`` (under jit or vmap) cannot be checked: a size beyond the array or
    below ``constants.min_grid_side`` gives wrong numbers (NaN once a pooled size reaches 0)
    instead of an error. The engine checks every glacier's real grid with :func:`check_grid`
    on the host before it pads.
    """
    if grid_size.shape != (2,) or not jnp.issubdtype(grid_size.dtype, jnp.integer):
        raise ValueError(
            f"grid_size must be an integer array (2,) = (H, W); got {grid_size.dtype}{grid_size.shape}"
        )
    if isinstance(grid_size, jax.core.Tracer):
        return
    true_height, true_width = (int(v) for v in grid_size)
    check_grid(true_height, true_width)
    if true_height > height or true_width > width:
        raise ValueError(
            f"grid_size {true_height}×{true_width} exceeds the padded corrector grid {height}×{width}"
        )


class Corrector(eqx.Module):
    """Fields (15, H, W) + monthly climate (2, M) → corrections d1..d5 (5, H, W)."""

    branch_2d: Branch2D
    branch_1d: Branch1D
    reproj_1d_to_2d_conv: eqx.nn.Conv1d
    fuse_conv: DoubleBlock
    out_conv: eqx.nn.Conv2d

    def __init__(self, key: PRNGKeyArray | None = None):
        """Random Equinox-default initialisation (``key`` defaults to PRNGKey(0))."""
        key = jr.PRNGKey(0) if key is None else key
        k2, k1, kr, kf, ko = jr.split(key, 5)
        self.branch_2d = Branch2D(k2)
        self.branch_1d = Branch1D(k1)
        self.reproj_1d_to_2d_conv = eqx.nn.Conv1d(WIDTH_1D, WIDTH_2D, 1, use_bias=False, key=kr)
        self.fuse_conv = DoubleBlock(WIDTH_2D, 2, kf)
        self.out_conv = eqx.nn.Conv2d(WIDTH_2D, N_OUT, 1, use_bias=True, key=ko)

    def climate_features(
        self, climate_monthly: Float[Array, "2 M"], n_months: Int[Array, ""] | int | None = None,
        channels_last: bool = False,
    ) -> Float[Array, "8 1"]:
        """The 1-D branch on the first ``n_months`` months of ``climate_monthly``.

        ``n_months=None`` uses all M columns. Otherwise ``climate_monthly`` is zero-padded
        to at least 14 columns and ``n_months`` (possibly traced) is 12, 13 or 14: the branch
        is evaluated for each static length and the matching result is selected, which
        equals running it on the unpadded series exactly (one compiled function serves
        every year). A traced value outside 12..14 is clipped into that range.
        """
        climate_monthly = jnp.asarray(climate_monthly, jnp.float32)
        if n_months is None:
            return self.branch_1d(climate_monthly, channels_last)
        if isinstance(n_months, (int, np.integer)) and not isinstance(n_months, bool):
            n_months = int(n_months)
            if n_months > climate_monthly.shape[1] or n_months < 1:
                raise ValueError(
                    f"n_months={n_months} does not fit a climate series of "
                    f"{climate_monthly.shape[1]} months"
                )
            return self.branch_1d(climate_monthly[:, :n_months], channels_last)
        if climate_monthly.shape[1] < max(MONTH_COUNTS):
            raise ValueError(
                f"with a traced n_months the climate series must be zero-padded to "
                f"{max(MONTH_COUNTS)} months; got {climate_monthly.shape[1]}"
            )
        candidates = jnp.stack([self.branch_1d(climate_monthly[:, :m], channels_last) for m in MONTH_COUNTS])
        index = jnp.clip(jnp.asarray(n_months) - MONTH_COUNTS[0], 0, len(MONTH_COUNTS) - 1)
        return candidates[index]

    def __call__(
        self,
        fields: Float[Array, "15 H W"],
        climate_monthly: Float[Array, "2 M"],
        n_months: Int[Array, ""] | int | None = None,
        grid_size: Int[Array, "2"] | None = None,
        channels_last: bool = False,
    ) -> Float[Array, "5 H W"]:
        """Corrections d1..d5 (5, H, W); see :meth:`climate_features` for ``n_months``.
        ``channels_last`` (static): the convolutions of training losses (:func:`conv`).

        ``grid_size`` = (H, W) (int, possibly traced) runs on a padded grid: ``fields`` is
        (15, Hp, Wp) with the glacier's grid in its top-left H×W block (the rest may hold any
        finite values); the result is (5, Hp, Wp), equal to the unpadded call on that block
        to float32 rounding and 0 elsewhere. A traced ``grid_size`` is not checked (see
        :func:`_check_grid_size`).
        """
        fields = jnp.asarray(fields, jnp.float32)
        if fields.ndim != 3 or fields.shape[0] != N_FIELDS:
            raise ValueError(f"corrector fields must be ({N_FIELDS}, H, W); got {fields.shape}")
        _, height, width = fields.shape
        check_grid(height, width)
        if grid_size is None:
            x2 = self.branch_2d(fields, channels_last=channels_last)  # (32, h, w)
            x1 = conv(self.reproj_1d_to_2d_conv, self.climate_features(climate_monthly, n_months, channels_last),
                      channels_last)
            x = self.fuse_conv(x2 + x1[:, :, None], channels_last=channels_last)  # (32, 1) over (h, w)
            out = conv(self.out_conv, x, channels_last) * OUT_SCALE
            return jax.image.resize(out, (N_OUT, height, width), "bilinear", antialias=False)
        grid_size = jnp.asarray(grid_size)
        _check_grid_size(grid_size, height, width)
        grid_size = grid_size.astype(jnp.int32)
        x2 = self.branch_2d(fields, grid_size, channels_last)  # (32, Hp//8, Wp//8), true block (H//8, W//8)
        x1 = conv(self.reproj_1d_to_2d_conv, self.climate_features(climate_monthly, n_months, channels_last),
                  channels_last)
        bottom_size = grid_size // 8  # three floor halvings
        mask = grid_mask(bottom_size, x2.shape[1:])
        x = self.fuse_conv(jnp.where(mask, x2 + x1[:, :, None], 0.0), mask, channels_last)
        out = jnp.where(mask, conv(self.out_conv, x, channels_last) * OUT_SCALE, 0.0)  # the bias is not zero
        return resize_bilinear_padded(out, bottom_size, grid_size, (height, width))
