"""Adam with its two moments stored in bfloat16 or float8 e4m3 (COAT, Xi et al., ICLR 2025).

COAT ("Compressing Optimizer states and Activation for memory-efficient FP8 Training") keeps
Adam's first moment m and second moment v in float8 e4m3 with one scale per group of
`group_size` elements and *dynamic range expansion*: before quantising, each group is mapped
through

    f(x) = sign(x) * |x|^k

with a per-group exponent k chosen so that the group's dynamic range R = max|x| / min|x|
becomes, after the map, as wide as the range e4m3 can hold (R^k <= R_fp8), and the inverse
|y|^(1/k) is applied after dequantising. For e4m3, whose relative rounding error is nearly the
same at every magnitude, the inverse divides that error by k, and a group whose small values
would underflow under plain absmax scaling keeps them.

The exact rule follows COAT's CUDA kernel (`fp8_adamw_expand_cuda_kernel.cu`, NVlabs/VILA
`llava/model/coat/optimizer/kernels/`), for a group with magnitudes in [min, max]:

    k     = floor(log2(448^2 / 2) / log2(max / min) * 16) / 16     (a multiple of 1/16)
    code  = sign(x) * 448 * (|x| / max)^k        stored in e4m3 (finite maximum 448)
    x     = sign(code) * max * (|code| / 448)^(1/k)

COAT's kernel first centres the group by c = sqrt(max * min) and stores three numbers per group
(c, k and scale s = (max/c)^k / 448); since (|x|/c)^k / s = 448 * (|x|/max)^k the codes are the
same, so here each group stores two: its absolute maximum and k. Two deliberate differences:
the group minimum is taken over the *non-zero* magnitudes (zero maps to zero exactly, so it needs
no range; COAT adds 1e-20 instead, which lets one zero, e.g. an unused embedding row, shrink k
for the whole group), and k is clipped to [1/16, 16] so that a group of equal magnitudes
(log R = 0) gets a finite exponent. COAT's groups are runs of 128 elements of the flattened
parameter; here a group is a tile that divides the parameter's shape (`group_tile`), which is
the same runs for a matrix whose rows are a multiple of 128 long and keeps every group inside
one shard of a sharded parameter.

bfloat16 is a plain cast: it has float32's 8-bit exponent, so neither a scale nor an expansion
changes its relative rounding error (at most 2^-8); only float8 carries scales and exponents.

The second moment is non-negative, so its codes are all >= 0 (e4m3's sign bit goes unused: JAX
has no unsigned e4m3) and its dequantised value, hence Adam's denominator, is never negative.

State layout: the quantised moments have each parameter's shape, at the same tree path as the
parameter (under `mu` / `nu`), so `mnemax.trainer.setup.follow_param_shardings` shards them like
the parameter under ZeRO 1/2/3; the per-group scales and exponents (float32, one each per
group, shaped `groups_shape(param.shape)`) have other shapes and stay replicated.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mnemax.errors import ConfigError

MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                 "float8_e4m3": jnp.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# COAT's target dynamic range after expansion (their kernel's `ratioUpperBound`): the smallest
# magnitude of a group lands at 448 / (448^2 / 2) = 2^-7.8, among e4m3's subnormals.
TARGET_RANGE = FP8_MAX**2 / 2
EXPONENT_STEPS = 16  # k is a multiple of 1/16 (COAT's `expand_min`)
MAX_EXPONENT = 16.0  # cap for groups whose magnitudes (nearly) all agree


def check_moments(dtype: str, group_size: int) -> None:
    """Raises ConfigError for an unknown moments dtype or a group size below 1."""
    if dtype not in MOMENT_DTYPES:
        raise ConfigError(f"optimizer.moments_dtype={dtype!r} is unknown; choose one of "
                          f"{', '.join(MOMENT_DTYPES)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"optimizer.moments_group_size={group_size!r} must be an integer >= 1 "
                          "(elements that share one float8 scale; COAT uses 128)")


def group_tile(shape: tuple[int, ...], group_size: int) -> tuple[int, ...]:
    """The block of elements that share one scale: per dimension, from the last one backwards,
    the largest divisor of its size that fits in what is left of `group_size` (or, when that
    divisor is under half of what is left, the smallest divisor above it).

    A matrix `[rows, cols]` with `cols` a multiple of `group_size` gets `(1, group_size)`:
    runs of `group_size` consecutive elements of a row, COAT's grouping. Because the tile
    divides every dimension, grouping only *splits* dimensions (`[d] -> [d / t, t]`) and never
    moves elements across the shards of a sharded parameter, which a flatten-and-pad grouping
    would (XLA lowers it to collective permutes). A tile may hold somewhat fewer or more than
    `group_size` elements when the sizes do not factor (a prime vocabulary, say).
    """
    tile = []
    room = group_size
    for size in reversed(shape):
        t = max((d for d in range(1, min(size, room) + 1) if size % d == 0), default=1)
        if size > room and 2 * t < room:  # a prime size, say: one larger group, not many tiny ones
            t = min(d for d in range(room, size + 1) if size % d == 0)
        tile.append(t)
        room //= t
    return tuple(reversed(tile))


def groups_shape(shape: tuple[int, ...], group_size: int) -> tuple[int, ...]:
    """Shape of the per-group scale and exponent of an array of `shape`: `shape / tile`."""
    return tuple(s // t for s, t in zip(shape, group_tile(shape, group_size), strict=True))


def _to_groups(x: jax.Array, group_size: int) -> jax.Array:
    """`[d0, d1, ...]` -> `[d0 / t0, t0, d1 / t1, t1, ...]` for the tile `t`; a group's elements
    lie along the odd axes."""
    tile = group_tile(x.shape, group_size)
    return x.reshape([n for s, t in zip(x.shape, tile, strict=True) for n in (s // t, t)])


def _group_axes(ndim: int) -> tuple[int, ...]:
    return tuple(range(1, 2 * ndim, 2))


def _broadcast_groups(stat: jax.Array) -> jax.Array:
    """`[g0, g1, ...]` -> `[g0, 1, g1, 1, ...]`, to broadcast against `_to_groups`."""
    return stat.reshape([n for g in stat.shape for n in (g, 1)])


def expansion_exponent(top: jax.Array, bottom: jax.Array) -> jax.Array:
    """COAT's k per group from its largest and smallest non-zero magnitude (same shapes): the
    largest multiple of 1/16 with (top / bottom)^k <= 448^2 / 2, clipped to [1/16, 16]."""
    log_range = jnp.log2(top / bottom)  # -inf for an all-zero group (top 0, bottom inf)
    k = jnp.floor(math.log2(TARGET_RANGE) / log_range * EXPONENT_STEPS) / EXPONENT_STEPS
    k = jnp.where(log_range > 0, k, MAX_EXPONENT)
    return jnp.clip(k, 1.0 / EXPONENT_STEPS, MAX_EXPONENT)


def quantize(x: jax.Array, dtype: str, group_size: int = 128, expand: bool = True
             ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Compresses `x` `[*shape]` (float32) for storage.

    Returns `(codes, scale, exponent)`: `codes` `[*shape]` in `dtype`; for float8_e4m3 `scale`
    `[*groups_shape]` float32 is each group's absolute maximum and `exponent` (same shape) its
    expansion exponent k (1 everywhere when `expand` is False: plain absmax scaling); for
    float32 and bfloat16 both are None.
    """
    check_moments(dtype, group_size)
    if dtype != "float8_e4m3":
        return x.astype(MOMENT_DTYPES[dtype]), None, None
    groups = _to_groups(x.astype(jnp.float32), group_size)
    magnitude = jnp.abs(groups)
    # One pass over each group for its largest and smallest non-zero magnitude.
    top, bottom = jax.lax.reduce(
        (magnitude, jnp.where(magnitude > 0, magnitude, jnp.inf)),
        (jnp.float32(0), jnp.float32(jnp.inf)),
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        _group_axes(x.ndim))
    k = expansion_exponent(top, bottom) if expand else jnp.ones_like(top)
    safe_top = _broadcast_groups(jnp.where(top > 0, top, 1.0))
    expanded = FP8_MAX * (magnitude / safe_top) ** _broadcast_groups(k)
    codes = jnp.sign(groups) * jnp.minimum(expanded, FP8_MAX)  # e4m3fn turns > 448 into nan
    return codes.astype(jnp.float8_e4m3fn).reshape(x.shape), top, k


def dequantize(codes: jax.Array, scale: jax.Array | None, exponent: jax.Array | None,
               group_size: int = 128) -> jax.Array:
    """Inverse of `quantize`: `codes` `[*shape]` (with `[*groups_shape]` scale and exponent for
    float8) -> float32 `[*shape]`."""
    if scale is None:
        return codes.astype(jnp.float32)
    groups = _to_groups(codes.astype(jnp.float32), group_size)
    magnitude = (jnp.abs(groups) / FP8_MAX) ** (1.0 / _broadcast_groups(exponent))
    return (jnp.sign(groups) * _broadcast_groups(scale) * magnitude).reshape(codes.shape)


class CompressedAdamState(NamedTuple):
    """Adam's state with compressed moments; `mu` / `nu` mirror the parameter tree."""

    count: jax.Array  # [] int32, steps taken
    mu: Any  # first moment, each leaf the parameter's shape, in the moments dtype
    nu: Any  # second moment, same layout
    mu_scale: Any  # per-group absmax of mu, leaves [*groups_shape] float32 (float8, else None)
    mu_exponent: Any  # per-group expansion exponent k of mu, same shapes (float8 only)
    nu_scale: Any  # same for nu
    nu_exponent: Any


def _quantize_tree(tree: Any, dtype: str, group_size: int, expand: bool
                   ) -> tuple[Any, Any, Any]:
    leaves, treedef = jax.tree.flatten(tree)
    parts = [quantize(leaf, dtype, group_size, expand) for leaf in leaves]
    codes = treedef.unflatten([p[0] for p in parts])
    if dtype != "float8_e4m3":
        return codes, None, None
    return (codes, treedef.unflatten([p[1] for p in parts]),
            treedef.unflatten([p[2] for p in parts]))


def _dequantize_tree(codes: Any, scale: Any, exponent: Any, group_size: int) -> Any:
    if scale is None:
        return jax.tree.map(lambda c: c.astype(jnp.float32), codes)
    return jax.tree.map(lambda c, s, k: dequantize(c, s, k, group_size), codes, scale, exponent)


def scale_by_compressed_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                             dtype: str = "float8_e4m3", group_size: int = 128,
                             eps_root: float = 0.0, expand: bool = True
                             ) -> optax.GradientTransformation:
    """`optax.scale_by_adam` (Kingma & Ba 2015, with its bias correction) whose moments are
    stored in `dtype` (float32 | bfloat16 | float8_e4m3) between steps.

    Each step dequantises m and v to float32, applies Adam's update in float32 and quantises the
    new moments again (as COAT's fused kernel does); the returned update is computed from the
    float32 moments before they are requantised. With `dtype="float32"` it is `scale_by_adam`.
    Updates and parameters: any pytree of float arrays (`optax.MaskedNode` leaves pass through).
    """
    check_moments(dtype, group_size)
    store = MOMENT_DTYPES[dtype]

    def init(params):
        def codes():
            return jax.tree.map(lambda p: jnp.zeros(p.shape, store), params)

        def per_group(fill):
            if dtype != "float8_e4m3":
                return None
            return jax.tree.map(
                lambda p: jnp.full(groups_shape(p.shape, group_size), fill, jnp.float32), params)

        return CompressedAdamState(count=jnp.zeros([], jnp.int32), mu=codes(), nu=codes(),
                                   mu_scale=per_group(0.0), mu_exponent=per_group(1.0),
                                   nu_scale=per_group(0.0), nu_exponent=per_group(1.0))

    def update(updates, state, params=None):
        del params
        mu = _dequantize_tree(state.mu, state.mu_scale, state.mu_exponent, group_size)
        nu = _dequantize_tree(state.nu, state.nu_scale, state.nu_exponent, group_size)
        mu = optax.tree.update_moment(updates, mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, nu, b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        mu, mu_scale, mu_exponent = _quantize_tree(mu, dtype, group_size, expand)
        nu, nu_scale, nu_exponent = _quantize_tree(nu, dtype, group_size, expand)
        return updates, CompressedAdamState(count=count, mu=mu, nu=nu, mu_scale=mu_scale,
                                            mu_exponent=mu_exponent, nu_scale=nu_scale,
                                            nu_exponent=nu_exponent)

    return optax.GradientTransformation(init, update)
