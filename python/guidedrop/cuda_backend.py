"""CUDA backend: the primitives of ``backend_contract.md`` on the ``guidedrop._C`` operators.

``guidedrop._C`` (built from ``csrc/``) registers ``torch.ops.guidedrop.<op>`` with CUDA
kernels; this module adds the fake (meta) implementations that ``torch.compile`` and
``torch.library.opcheck`` trace with, and the thin glue from the contract's signatures to
the operators' schemas. No host synchronisation anywhere.

Importing it raises ImportError (with the build command) when the extension is not built;
:func:`guidedrop.dispatch.load` turns that into "backend unavailable".
"""

from __future__ import annotations

import torch

from guidedrop import _validation, autograd
from guidedrop.layers import (
    Plan,
    _rate,
    _seed_rate,
    beta_count,
    rand,
    rate64,
    top_count,
)
from guidedrop.reference import blocks_dropped, fitted_block, one_window, pooled_size
from guidedrop.reference import rate_tensor as _rate_tensor

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.guidedrop.*)
except ImportError as e:  # not built, or built against another torch
    import importlib.util

    # Not built: say so (Python's own message for a missing submodule speaks of a
    # "partially initialized module" and a circular import, which misleads).
    built = importlib.util.find_spec("guidedrop._C") is not None
    why = f"does not import ({e})" if built else "is not built"
    # ModuleNotFoundError (named guidedrop._C) where it is not built: dispatch.load passes
    # over that quietly, and warns of a build that does not import.
    raise (ImportError if built else ModuleNotFoundError)(
        f"guidedrop._C, the CUDA extension, {why}. Build it against the "
        "installed torch on a machine with nvcc, as the README says: "
        "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` (with "
        "FORCE_CUDA=1 where no GPU is visible). It runs CUDA tensors only (with "
        "GUIDEDROP_BACKEND=auto, CPU tensors take the reference backend).",
        name="guidedrop._C") from e
# A build against another torch may load (its symbols found) and still not fit this torch's
# ABI: refuse to run it, by the version setup.py recorded.
if getattr(_C, "torch_version", torch.__version__) != torch.__version__:
    raise ImportError(
        f"guidedrop._C, the CUDA extension, was built against torch {_C.torch_version}; this "
        f"is torch {torch.__version__}. Rebuild it against the installed torch: "
        "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`")

name = "cuda"

_ops = torch.ops.guidedrop
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The primitives of guidedrop._C (backend_contract.md; schemas in csrc/guidedrop.cpp).
OPS = (
    "pooled_correlation", "channel_stats", "kth_largest", "map_threshold", "attention_stats",
    "cam", "seed_bits", "seed_coverage", "apply_channel", "apply_block", "apply_seeds",
    "apply_attention",
)
# The plan kernels (csrc/cuda/plans/): a layer's arithmetic between its statistics and its
# apply in one launch (issue 12), used by guidedrop.layers through the plan_<layer> below.
PLAN_OPS = ("selectscale_plan", "selectout_plan", "focused_dropout_plan", "attentiondrop_plan",
            "seeds_plan", "corrdrop_plan", "camdrop_plan")


def unavailable() -> str:
    """Why the kernels cannot run here; empty when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return ""


def unsupported(x: torch.Tensor) -> str:
    """Why the kernels cannot take ``x``; empty when they can."""
    if not x.is_cuda:
        return f"x is on {x.device}; the CUDA kernels need a CUDA tensor"
    if x.dtype not in _DTYPES:
        return f"x has dtype {x.dtype}; the CUDA kernels take float32, float16 or bfloat16"
    return ""


# --------------------------------------------------------------------------- statistics


def pooled_correlation(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> F: (N, ceil(H/k), ceil(W/k)) float32, SPEC §2 step 2; any int
    k >= 1 (larger than the map: one window, so clamped before the int64 op schema)."""
    return _ops.pooled_correlation(x, one_window(k, x.shape[-2], x.shape[-1]))


def channel_stats(x: torch.Tensor, applied: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) -> (max |x|, mean), each (N, C) float32; ``applied`` a 0-d bool on
    x's device: False reads nothing of x and gives 0, 0 (backend_contract.md)."""
    return _ops.channel_stats(x, applied)


def kth_largest(v: torch.Tensor, k: int) -> torch.Tensor:
    """v: (R, L) float32 -> (R,) float32, the k-th largest value of each row (ties counted)."""
    return _ops.kth_largest(v, k)


def map_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C) float32, the k-th largest value of each map."""
    return _ops.map_threshold(x, k)


def attention_stats(x, k, active, mode):
    """x: (N, C, H, W), active: (N, C) bool -> (thr, mn, r, msum), each (N, C): float32,
    msum float64 (exact: backend_contract.md); r = 1 / (max - min) rounded up.

    Entries of inactive maps are 0.
    """
    thr, mn, r, msum = _ops.attention_stats(x, k, active, mode)
    return thr, mn, r, msum


def cam(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W), alpha: (N, C) -> J: (N, H, W) float32 = sum_c alpha[n, c] x[n, c]."""
    return _ops.cam(x, alpha.to(torch.float32))


# --------------------------------------------------------------------------- seed masks


def seed_bits(noise, generator, g, r, cand_s, cand_c, shape, device):
    """Packed seeds uint8 (N, ceil(Cs*H*W/8)); see backend_contract.md.

    Without ``noise`` the kernel draws Philox uniforms from ``generator`` (default: the
    CUDA generator of ``device``), graph-safe, keyed by the logical element index.
    """
    # Only the device of this tensor is read: it lets the dispatcher pick the CUDA kernel
    # when noise, cand_s and cand_c are all None.
    device_like = torch.empty(0, dtype=torch.uint8, device=device)
    # g stays a tensor (loaded in the kernel): a rate is a runtime value, never a
    # compile-time constant or a host read (SPEC §8).
    g = _rate_tensor(g, device).to(device=device, dtype=torch.float32)
    return _ops.seed_bits(device_like, noise, cand_s, cand_c, list(shape), g, int(r),
                          generator)


def seed_coverage(bits: torch.Tensor, r: int, cs: int, h: int, w: int) -> torch.Tensor:
    """(N,) int64: units covered by the r x r expansion of the seeds (summed over Cs)."""
    return _ops.seed_coverage(bits, r, cs, h, w)


# --------------------------------------------------------------------------- apply
# The multipliers are float32 (the reference casts them to float32 before multiplying).


def _apply(op, *args):
    """An apply op. The layers' Function calls the applies with grad mode off, eagerly: then
    past the op's autograd kernel (autograd.register_apply_ops), a Python one that costs
    ~6 µs of host time a call and has nothing to record. Traced (torch.compile,
    torch.export), or with grad mode on (a caller other than the Function, whose output
    must keep its graph), the op itself."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def apply_channel(t, w):
    """t: (N, C, H, W), w: (N, C) -> t * w[n, c]."""
    return _apply(_ops.apply_channel, t, w.to(torch.float32))


def apply_block(t, mask, k, scale):
    """t * (mask[n, h//k, w//k] * scale[n]); mask: (N, Hs, Ws) uint8, scale: (N,)."""
    k = one_window(k, t.shape[-2], t.shape[-1])  # larger: one block, same indices
    return _apply(_ops.apply_block, t, mask.to(torch.uint8), k, scale.to(torch.float32))


def apply_seeds(t, bits, r, shared, scale):
    """t * ((1 - dropped) * scale[n]), dropped = r x r expansion of the packed seeds."""
    return _apply(_ops.apply_seeds, t, bits, r, shared, scale.to(torch.float32))


def apply_attention(t, x, state, active, mode):
    """t * (S * scale[n]) where active, t * scale[n] elsewhere; S from x (SPEC §4); state
    (N, C, 4): reference.attention_state."""
    return _apply(_ops.apply_attention, t, x, state.to(torch.float32), active, mode)


# --------------------------------------------------------------------------- plans
# layers.<layer> calls plan_<layer> (layers.fusable): the statistics and plan kernels (one
# op or two; launches.KERNELS counts them) and the Plan the apply kernel takes, bit for bit
# the reference plan's. noise of any floating dtype goes to the kernel as it is (rounded to
# float32 there: no .to launch; float8, which the ops do not read, is float32 already:
# layers.fusable); without noise, one torch.rand exactly as layers.rand draws it, but for
# DropBlock's and CamDrop's seeds, drawn with Philox in the kernel. Rates are passed as they
# come (python floats, or symbolic under torch.compile): runtime arguments of the ops, never
# float() here (that would specialise the compiled graph on the rate).
#
# Under torch.compile a python float argument of a custom op is a constant of the graph:
# Dynamo specialises on it, one recompile per rate. So while tracing (only then) the rates
# go as tensors that the kernel reads (the float arguments are then placeholders): two
# rates as a float64 (2,) tensor (_rates), one as a 0-dim float32 tensor (_runtime_rate),
# CorrDrop's p_blocks and CamDrop's k_c as 0-dim float64 tensors; eagerly they go as
# floats, with no launch to build a tensor.


def _rates(x, a, b):
    """None in eager mode; while torch.compile traces, [a, b] as a float64 (2,) tensor on
    x's device (ones * q, as layers._rate: q stays symbolic, no host-to-device copy)."""
    if not torch.compiler.is_compiling():
        return None
    one = torch.ones((), dtype=torch.float64, device=x.device)
    return torch.stack([one * a, one * b])


def _floats(rates, a, b):
    """The float arguments of a plan op: the rates, or placeholders when `rates` carries them."""
    return (a, b) if rates is None else (0.0, 0.0)


def plan_selectscale(x, top_rate, retain, *, noise=None, generator=None):
    """SPEC §3. x: (N, C, H, W); noise: (N, C) or None -> Plan("channel", (), (w,)), w (N, C)
    float32. 2 launches (channel_stats, selectscale_plan), +1 without noise (rand)."""
    amax, _ = channel_stats(x)
    u = noise if noise is not None else rand(x.shape[:2], generator, x.device)
    rates = _rates(x, top_rate, retain)
    w = _ops.selectscale_plan(amax, u, *_floats(rates, top_rate, retain), rates)
    return Plan("channel", (), (w,))


def plan_selectout(x, top_rate, keep, *, noise=None, generator=None):
    """SPEC §3. x: (N, C, H, W); noise: (N, C) or None -> Plan("channel", (), (w,)), w (N, C)
    float32. RuntimeError when round((1 - keep) * C) exceeds the candidates."""
    amax, _ = channel_stats(x)
    u = noise if noise is not None else rand(x.shape[:2], generator, x.device)
    rates = _rates(x, top_rate, keep)
    w = _ops.selectout_plan(amax, u, *_floats(rates, top_rate, keep), rates)
    return Plan("channel", (), (w,))


def plan_focused_dropout(x, low, high, *, per_position, noise=None, generator=None,
                         applied=None):
    """SPEC §5. x: (N, C, H, W); noise: (N, H, W) if per_position else (N,), or None;
    applied: None or a 0-d bool on x's device (False: both kernels skip x, mask all ones)
    -> Plan("block", (1,), (mask (N, H, W) uint8, scale (N,) float32 ones))."""
    n, _, h, w = x.shape
    _, mean = channel_stats(x, applied)
    u = noise if noise is not None else rand((n, h, w) if per_position else (n,), generator,
                                             x.device)
    rates = _rates(x, low, high)
    mask, scale = _ops.focused_dropout_plan(x, mean, u, *_floats(rates, low, high), per_position,
                                            rates, applied)
    return Plan("block", (1,), (mask, scale))


def _runtime_rate(q, x):
    """A rate as the plan ops take it: (None, float(q)) in eager mode, a kernel argument;
    (0-dim float32 tensor, 0.0) while torch.compile traces, so that a new rate is a new
    input of the graph, not a recompile (a float argument of an op is specialised on)."""
    if torch.compiler.is_compiling():
        return _rate(q, x), 0.0
    return None, float(q)


def plan_corrdrop(x, p, block_size, *, normalize, noise=None, generator=None):
    """SPEC §2 in 2 launches before the apply (F, then S and the scale; +1 ``torch.rand``
    without noise).

    x: (N, C, H, W) float32/float16/bfloat16; noise: (2, N, H', W') float32/float64/
    float16/bfloat16 (rounded to float32), or None -> Plan("block", (k,), (S (N, H', W')
    uint8, scale (N,) float32)), k = min(block_size, max(H, W)), H' = ceil(H / k), W' = ceil(W / k).
    """
    n, c, h, w = x.shape
    k = one_window(block_size, h, w)
    u = noise if noise is not None else rand((2, n, *pooled_size(h, w, k)), generator,
                                             x.device)
    # eq. 11 times N' with the real block size, float64 as the reference's: a kernel
    # argument in eager mode, a 0-dim float64 tensor while torch.compile traces (a new p is
    # then a new input, not a recompile: _runtime_rate's, unrounded)
    p_blocks = blocks_dropped(rate64(p, x.device), h, w, block_size)
    p_t, p_blocks = (p_blocks, 0.0) if torch.compiler.is_compiling() else (None, p_blocks)
    keep, scale = _ops.corrdrop_plan(x, u, p_t, p_blocks, k, normalize)
    return Plan("block", (k,), (keep, scale))


def plan_attentiondrop(x, alpha, beta, *, mode, normalize, noise=None, generator=None):
    """SPEC §4 in 2 launches before the apply (+1 ``torch.rand`` without noise).

    x: (N, C, H, W) float32/float16/bfloat16; noise: (N, C) float32/float64/float16/bfloat16,
    or None -> Plan("attention", (mode,), (state (N, C, 4) float32, reference.attention_state:
    thr, scale[n], mn, r, thr, mn and r 0 where inactive; active (N, C) bool)).
    gamma = u < alpha, both rounded to float32.
    """
    n, c, h, w = x.shape
    u = noise if noise is not None else rand((n, c), generator, x.device)
    n_beta = beta_count(beta, h, w)
    a_t, a = _runtime_rate(alpha, x)
    state, active = _ops.attentiondrop_plan(x, u, a_t, a, n_beta, mode, normalize)
    return Plan("attention", (mode,), (state, active))


def plan_dropblock(x, p, block_size, *, shared_channels, normalize, noise=None,
                   generator=None):
    """SPEC §7 in 2 launches before the apply (seeds, coverage + scale), with or without
    noise (Philox in the seed kernel).

    x: (N, C, H, W); noise: (N, Cs, H, W) float32/float64/float16/bfloat16 (Cs = 1 if
    shared_channels else C), or None -> Plan("seeds", (1, shared), (blocks (N,
    ceil(Cs*H*W/8)) uint8, scale (N,) float32)), blocks the seeds' packed r x r blocks
    (``layers._seeds_plan``).
    """
    n, c, h, w = x.shape
    r = fitted_block(block_size, h, w)
    shape = [n, 1 if shared_channels else c, h, w]
    g_t, g = _runtime_rate(_seed_rate(rate64(p, x.device), r, h, w), x)
    blocks, scale = _ops.seeds_plan(x, noise, None, None, shape, g_t, g, r, c, normalize,
                                    generator)
    return Plan("seeds", (1, shape[1] == 1), (blocks, scale))


def plan_camdrop(x, weight, target, block_size, keep, *, channel_rate, normalize, noise=None,
                 generator=None):
    """SPEC §6 in 4 launches before the apply (alpha and the CAM, the candidates, the seeds,
    the coverage + scale), with or without noise (Philox in the seed kernel).

    x: (N, C, H, W) float32/float16/bfloat16; weight: (K, C_fc) floating, C_fc a multiple of
    C; target: (N,) class indices of any integer dtype (int64, int32, int16, int8, uint8) and
    stride, read by value; noise: (N, C, H, W) float32/float64/float16/bfloat16, or None.
    Returns None when the block does not fit the map (r > H or r > W), else Plan("seeds",
    (1, C == 1), (blocks (N, ceil(C*H*W/8)) uint8, scale (N,) float32)), blocks as
    plan_dropblock's.
    On a GPU a target outside [0, K) is an asynchronous device assertion naming ``target``
    in the first kernel (SPEC §6 step 0: no host sync); RuntimeError for a bad dtype, shape
    or device.
    """
    n, c, h, w = x.shape
    r = block_size
    if fitted_block(r, h, w) < r:  # no valid centre: none dropped, and no kernel checks target
        # SPEC §6 step 0 all the same (a GPU target, or one seen while compiling), as the
        # reference and the Triton plan: a bad target is an error whatever the block size.
        if not _validation.target_checked_on_host(target):
            _validation.assert_target(target, weight.shape[0])
        return None
    k_s = max(1, (h * w) // (r * r))
    k_c = top_count(channel_rate, c, x.device)  # a tensor while torch.compile traces
    k_c, k_c_t = (1, k_c) if isinstance(k_c, torch.Tensor) else (k_c, None)
    g_t, g = _runtime_rate(_seed_rate(1 - rate64(keep, x.device), r, h, w), x)
    blocks, scale = _ops.camdrop_plan(x, weight.detach(), target, noise, g_t, g, r, k_s, k_c,
                                      normalize, generator, k_c_t)
    return Plan("seeds", (1, c == 1), (blocks, scale))  # as layers._seeds_plan: Cs = C


# --------------------------------------------------------------------------- fake kernels
# Shapes, dtypes and memory formats of the outputs, for torch.compile and opcheck.


def _register_fakes() -> None:
    register = torch.library.register_fake

    def stats(x, dtype=torch.float32):
        return x.new_empty((x.shape[0], x.shape[1]), dtype=dtype)

    @register("guidedrop::pooled_correlation")
    def _(x, k):
        n, _, h, w = x.shape
        return x.new_empty((n, *pooled_size(h, w, k)), dtype=torch.float32)

    @register("guidedrop::channel_stats")
    def _(x, applied=None):
        return stats(x), stats(x)

    @register("guidedrop::kth_largest")
    def _(v, k):
        return v.new_empty((v.shape[0],), dtype=torch.float32)

    @register("guidedrop::map_threshold")
    def _(x, k):
        return stats(x)

    @register("guidedrop::attention_stats")
    def _(x, k, active, mode):
        return stats(x), stats(x), stats(x), stats(x, torch.float64)

    @register("guidedrop::cam")
    def _(x, alpha):
        n, _, h, w = x.shape
        return x.new_empty((n, h, w), dtype=torch.float32)

    @register("guidedrop::seed_bits")
    def _(device_like, noise, cand_s, cand_c, shape, g, r, generator=None):  # g: 0-dim f32
        n, cs, h, w = shape
        return device_like.new_empty((n, (cs * h * w + 7) // 8), dtype=torch.uint8)

    @register("guidedrop::attentiondrop_plan")
    def _(x, noise, alpha_t, alpha, k, mode, normalize):
        n, c = x.shape[:2]
        return (x.new_empty((n, c, 4), dtype=torch.float32),
                x.new_empty((n, c), dtype=torch.bool))

    @register("guidedrop::corrdrop_plan")
    def _(x, noise, p_t, p, k, normalize):  # k: clamped by plan_corrdrop (no max of sizes:
        n, _, h, w = x.shape                   # a guard on H vs W with symbolic sizes)
        return (x.new_empty((n, *pooled_size(h, w, k)), dtype=torch.uint8),
                x.new_empty((n,), dtype=torch.float32))

    @register("guidedrop::seeds_plan")
    def _(device_like, noise, cand_s, cand_c, shape, g_t, g, r, c, normalize, generator=None):
        n, cs, h, w = shape
        return (device_like.new_empty((n, (cs * h * w + 7) // 8), dtype=torch.uint8),
                device_like.new_empty((n,), dtype=torch.float32))

    @register("guidedrop::camdrop_plan")
    def _(x, weight, target, noise, g_t, g, r, k_s, k_c, normalize, generator=None,
          k_c_t=None):
        n, c, h, w = x.shape
        return (x.new_empty((n, (c * h * w + 7) // 8), dtype=torch.uint8),
                x.new_empty((n,), dtype=torch.float32))

    @register("guidedrop::seed_coverage")
    def _(bits, r, cs, h, w):
        return bits.new_empty((bits.shape[0],), dtype=torch.int64)

    def like(t):
        return torch.empty_like(t)  # t's memory format, as the CUDA op's at::empty_like

    @register("guidedrop::apply_channel")
    def _(t, w):
        return like(t)

    @register("guidedrop::apply_block")
    def _(t, mask, k, scale):
        return like(t)

    @register("guidedrop::apply_seeds")
    def _(t, bits, r, shared, scale):
        return like(t)

    @register("guidedrop::apply_attention")
    def _(t, x, state, active, mode):
        return like(t)

    @register("guidedrop::selectscale_plan")
    def _(amax, noise, top_rate, retain, rates=None):
        return amax.new_empty(amax.shape, dtype=torch.float32)

    @register("guidedrop::selectout_plan")
    def _(amax, noise, top_rate, keep, rates=None):
        return amax.new_empty(amax.shape, dtype=torch.float32)

    @register("guidedrop::focused_dropout_plan")
    def _(x, mean, noise, low, high, per_position, rates=None, applied=None):
        n, _, h, w = x.shape
        return (x.new_empty((n, h, w), dtype=torch.uint8),
                x.new_empty((n,), dtype=torch.float32))


_register_fakes()
autograd.register_apply_ops(_ops)
