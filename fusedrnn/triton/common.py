"""Pieces shared by the Triton recurrences (lstm.py, gru.py, rnn.py): jit helpers and the one launch point.

Every kernel runs one layer-direction over the whole sequence in ONE launch. Grid: one program per
BLOCK_B batch rows; a program owns every hidden unit of its rows, so the state h_t only travels between
threads of one program: it is stored to global memory (L1/L2), ``tl.debug_barrier()`` (bar.sync, which
orders the block's global accesses), then re-read at step t+1. No cross-program exchange, so the kernels
also run under Triton's serial interpreter. Each step tiles the hidden units (BLOCK_N) and every
reduction (BLOCK_K), so any H and P work; only int32 offsets within one time step bound the sizes
(``check_sizes``). Time-plane offsets are int64.

Matrix tiles use row-major (rows, cols) layouts with an explicit row stride; ``tile_matmul`` multiplies
an activation tile by a weight matrix in the weights' dtype (tensor cores for fp16/bf16) with an fp32
accumulator; fp32 runs tf32 or exact ("ieee") per ``precision``. Activations are computed in fp32 without
libdevice (the interpreter has no libdevice, and one formula everywhere keeps CPU tests and GPU runs on the
same math): tanh is its odd Taylor series below |x| = 0.625 and 2 * sigmoid(2x) - 1 above.
"""

import collections
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

BLOCK_B = 16  # batch rows per program; tl.dot needs M >= 16 on GPUs
MAX_BLOCK_N = 32  # hidden units per tile (module attributes so tests can shrink them to exercise tiling)
MAX_BLOCK_K = 32  # reduction width per tl.dot; 64-wide tiles spill registers on sm_90 (ptxas -v), 32 barely
_INT32_MAX = 2**31 - 1

# Two variants run the same kernels. "persistent": one launch per layer-direction and pass, one program per
# BLOCK_B batch rows looping over all steps and owning every unit (today's design, above). "split": per step, one
# launch per phase over (batch tile x BLOCK_N units or outputs) programs, so at small B the grid still covers the
# SMs and each program streams only its units' rows of W_hh instead of all of it: the persistent variant at B <= 16
# runs on ONE SM that reads all of W_hh (1 MiB at the book's H = 256 in float32) every step; split spreads that
# over H / BLOCK_N programs, for a launch per phase and step: on a GPU, a call whose launches repeat (same shapes
# and pointers, as in a training loop) replays them from a CUDA graph instead (_graphed). Phases are the parts of a step separated by a barrier: each reads
# what other programs wrote in the phase before. The persistent launch runs all phases; under the interpreter
# (serial programs) both variants run. VARIANT (FUSEDRNN_TRITON_VARIANT) forces one; "auto" asks
# fusedrnn/planner.py.
# Phase bits (constexpr: kernels may read only constexpr globals): the units over H; over the P outputs the
# projection, dL/dh_t, and the carry dh_{t-1} = dG W_hh.
UNITS, OUTS, DH, CARRY = (tl.constexpr(1 << k) for k in range(4))
VARIANTS = ("auto", "persistent", "split")
# The kernels' step-range arguments: never specialized on their values (Triton compiles separate variants for
# arguments equal to 1 or divisible by 16 otherwise, and the split variant passes every step number).
STEP_RANGE = ["s_begin", "s_end"]
VARIANT = os.environ.get("FUSEDRNN_TRITON_VARIANT", "auto")

# True when the kernels were built for the interpreter (TRITON_INTERPRET=1 when they were imported):
# then they run on CPU tensors only. Fixed at import, as triton.jit decides it then.
INTERPRETED = bool(triton.knobs.runtime.interpret)


# ---- jit helpers -----------------------------------------------------------------------------------------
@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x): exactly 0 or 1 once saturated, never NaN for finite or infinite x."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    """libdevice-free tanh with float32's relative precision everywhere. 2 sigmoid(2x) - 1 alone has an absolute
    error of ~eps, which near 0 is a large relative one (tanh(1e-5) off by ~1e-3); below |x| = 0.625 the odd
    Taylor series through x^19 (coefficients 2^2n (2^2n - 1) B_2n / (2n)!; truncation < 1e-8 relative) runs
    instead. NaN takes the sigmoid branch and stays NaN; +-inf gives +-1."""
    z = x * x
    p = -2.3912911424355248e-04
    p = p * z + 5.900274409455860e-04
    p = p * z + -1.4558343870513183e-03
    p = p * z + 3.592128036572481e-03
    p = p * z + -8.863235529902197e-03
    p = p * z + 2.1869488536155203e-02
    p = p * z + -5.396825396825397e-02
    p = p * z + 1.3333333333333333e-01
    p = p * z + -3.333333333333333e-01
    return tl.where(tl.abs(x) < 0.625, x + x * z * p, 2.0 * sigmoid(2.0 * x) - 1.0)


@triton.jit
def own_range(dim, span, phases, PHASE: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the units (or outputs) of a dimension of size `dim` this program owns in phase PHASE: span of
    them from program_id(1) * span (the persistent variant passes a span >= dim: all of them; the split variant
    span = BLOCK_N: one tile); empty when the launch's phase mask `phases` leaves PHASE out. span is a multiple
    of BLOCK_N (common.launch), which the hint on lo tells the compiler; callers mask their tiles with
    `cols < dim`, not `< hi` (equal within [lo, hi)). With both, tiles whose dim is a multiple of 16 load in
    8- and 16-byte vectors instead of single elements."""
    lo = tl.multiple_of(tl.program_id(1) * span, BLOCK_N)
    hi = tl.minimum(lo + span, dim)
    return lo, tl.where((phases & PHASE) != 0, hi, lo)


@triton.jit
def time_index(k, T, REVERSE: tl.constexpr):
    """The time index (int64) of the k-th step of the layer's direction: k, or T-1-k when REVERSE."""
    t = tl.cast(k, tl.int64)
    if REVERSE:
        t = T - 1 - t
    return t


@triton.jit
def batch_tile(len_ptr, T, B, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's batch rows [BLOCK_B], which of them exist, and their lengths (T without len_ptr)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lens = tl.full([BLOCK_B], T, tl.int64)
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
    return rows, row_ok, lens


@triton.jit
def forward_step(s, T, B, P, lens, row_ok, h0_ptr, y_ptr, REVERSE: tl.constexpr):
    """Forward step s: its time index t, which rows have it (valid [BLOCK_B]), and where h_{t-1} lives: a
    (B, P) matrix, h0 at s = 0, else y at step s-1's time (y: (T, B, P))."""
    t = time_index(s, T, REVERSE)
    h_prev = tl.where(s == 0, h0_ptr, y_ptr + time_index(s - 1, T, REVERSE) * B * P)
    return t, row_ok & (t < lens), h_prev


@triton.jit
def load_tile(ptr, stride, rows, row_ok, cols, col_ok):
    """fp32 tile [rows, cols] of a row-major matrix whose rows are `stride` apart; zeros outside."""
    mask = row_ok[:, None] & col_ok[None, :]
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, stride, rows, row_ok, cols, col_ok, value):
    """Store an fp32 tile into a row-major matrix of ptr's dtype."""
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def tile_matmul(a_ptr, a_stride, w_ptr, w_stride_k, w_stride_n, rows, row_ok, cols, col_ok, K,
                PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[b, n] = sum_k a[rows[b], k] * w[k, cols[n]] for k < K, accumulated in fp32.

    a: row-major, rows `a_stride` apart, any float dtype (cast to w's); w[k, n] lives at
    w_ptr + k * w_stride_k + n * w_stride_n, so (w_stride_k, w_stride_n) = (1, K) reads W^T of a row-major W."""
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * a_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * w_stride_k + cols[None, :] * w_stride_n,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = a.to(w.dtype)
        if PRECISION == "tf32":
            a, w = round_to_tf32(a), round_to_tf32(w)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def round_to_tf32(x):
    """fp32 x rounded to nearest (ties to even) at tf32's 10 mantissa bits; inf and NaN kept as they are.

    Triton's tf32 dot hands the raw fp32 bits to the tensor cores, which drop the low 13 mantissa bits: a
    truncation, biased toward zero, whose error is about 2x that of cuBLAS / cuDNN (they round to nearest),
    enough to fail an oracle of 2x torch.nn's error. Rounded here first, the truncation drops only zeros.
    Plain integer arithmetic on the bits, so the interpreter runs the same rounding as the GPU."""
    bits = x.to(tl.uint32, bitcast=True)
    ties_to_even = (bits >> 13) & 1
    rounded = (bits + 0xFFF + ties_to_even) & 0xFFFFE000
    special = (bits & 0x7F800000) == 0x7F800000
    return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)


@triton.jit
def hidden_preact(gate, h_ptr, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, P, HAS_BIAS: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(h W_hh^T + b_hh) for gate row block `gate`, hidden units `cols`: fp32 [BLOCK_B, BLOCK_N].

    h: (B, P) at h_ptr; w_hh: (G*H, P); b_hh: (G*H,), read only when HAS_BIAS."""
    acc = tile_matmul(h_ptr, P, w_hh_ptr + gate * H * P, 1, P, rows, row_ok, cols, col_ok, P,
                      PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_hh_ptr + gate * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return overflow_like_storage(acc, w_hh_ptr.dtype.element_ty)


@triton.jit
def overflow_like_storage(v, DTYPE):
    """fp32 v, with the values that overflow DTYPE (fp16: |v| > 65504) made +-inf and the rest kept in fp32.

    torch.nn and reference.py round h W_hh^T + b_hh to x's dtype before adding x W_ih^T + b_ih, so in fp16
    a hidden product beyond the range is inf there and meets an infinite input side as inf - inf = NaN;
    this reproduces exactly those overflows without giving up the fp32 sum elsewhere."""
    if DTYPE != tl.float32:
        rounded = v.to(DTYPE).to(tl.float32)
        v = tl.where(tl.abs(rounded) == float("inf"), rounded, v)
    return v


@triton.jit
def gate_preact(gate, G, gx_t_ptr, h_ptr, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, P,
                HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """The full pre-activation gx_t + h W_hh^T + b_hh of gate row block `gate` of G. gx_t: (B, G*H)."""
    return load_tile(gx_t_ptr + gate * H, G * H, rows, row_ok, cols, col_ok) + hidden_preact(
        gate, h_ptr, w_hh_ptr, b_hh_ptr, rows, row_ok, cols, col_ok, H, P, HAS_BIAS, PRECISION, BLOCK_B, BLOCK_N,
        BLOCK_K)


@triton.jit
def store_held(y_t_ptr, h_prev_ptr, W, rows, row_ok, cols, col_ok, valid, h_new):
    """y_t = h_new on rows that have this step, else the held h_{t-1}. y_t, h_prev: (B, W)."""
    h_old = load_tile(h_prev_ptr, W, rows, row_ok, cols, col_ok)
    store_tile(y_t_ptr, W, rows, row_ok, cols, col_ok, tl.where(valid[:, None], h_new, h_old))


@triton.jit
def add_output_grad(dh_ptr, dy_t_ptr, dht_ptr, dhy_t_ptr, valid, rows, row_ok, P, span, phases,
                    STORE_DHY: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward, first phase of a step (DH): the gradient reaching h_t, on this program's outputs.

    dht = dh + dy_t on rows with a step t (dy is ignored at padded steps); with STORE_DHY also
    dhy_t = dht there and 0 elsewhere (for dW_hr). dh, dht: (B, P) fp32; dy_t, dhy_t: (B, P)."""
    keep = valid[:, None]
    lo, hi = own_range(P, span, phases, DH, BLOCK_N)
    for p0 in range(lo, hi, BLOCK_N):
        cols = p0 + tl.arange(0, BLOCK_N)
        col_ok = cols < P
        dy = load_tile(dy_t_ptr, P, rows, row_ok, cols, col_ok)
        dht = load_tile(dh_ptr, P, rows, row_ok, cols, col_ok) + tl.where(keep, dy, 0.0)
        store_tile(dht_ptr, P, rows, row_ok, cols, col_ok, dht)
        if STORE_DHY:
            store_tile(dhy_t_ptr, P, rows, row_ok, cols, col_ok, tl.where(keep, dht, 0.0))


@triton.jit
def backward_step(s, T, B, P, lens, rows, row_ok, dh_buf_ptr, dy_ptr, dht_ptr, dhy_ptr, phases, span,
                  STORE_DHY: tl.constexpr, REVERSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Backward step s undoes forward step k = T-1-s at time t. Runs add_output_grad (phase DH: dh from plane
    s % 2 of the (2, B, P) dh_buf, dy and dhy: (T, B, P)) and the barrier after it; returns (k, t, valid)."""
    k = T - 1 - s
    t = time_index(k, T, REVERSE)
    valid = row_ok & (t < lens)
    add_output_grad(dh_buf_ptr + (s % 2) * B * P, dy_ptr + t * B * P, dht_ptr, dhy_ptr + t * B * P, valid,
                    rows, row_ok, P, span, phases, STORE_DHY, BLOCK_N)
    tl.debug_barrier()
    return k, t, valid


@triton.jit
def carry_hidden_grad(dg_t_ptr, GH, w_hh_ptr, dht_ptr, z_ptr, z_stride, dh_out_ptr, valid, rows, row_ok, P, span,
                      phases, HAS_DIRECT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward, last phase of a step (CARRY), on this program's outputs: dh_{t-1} = dG_t W_hh (+ z * dh_t, the
    GRU's direct path, when HAS_DIRECT) on rows that had step t, else dh_t (held).

    dG_t: (B, GH) hidden-side gate grads; w_hh: (GH, P); dht, dh_out: (B, P) fp32; z: rows z_stride apart."""
    lo, hi = own_range(P, span, phases, CARRY, BLOCK_N)
    for p0 in range(lo, hi, BLOCK_N):
        cols = p0 + tl.arange(0, BLOCK_N)
        col_ok = cols < P
        acc = tile_matmul(dg_t_ptr, GH, w_hh_ptr, P, 1, rows, row_ok, cols, col_ok, GH,
                          PRECISION, BLOCK_B, BLOCK_N, BLOCK_K)
        dht = load_tile(dht_ptr, P, rows, row_ok, cols, col_ok)
        if HAS_DIRECT:
            acc += dht * load_tile(z_ptr, z_stride, rows, row_ok, cols, col_ok)
        store_tile(dh_out_ptr, P, rows, row_ok, cols, col_ok, tl.where(valid[:, None], acc, dht))


# ---- host side -------------------------------------------------------------------------------------------
def _block(dim, cap):
    return max(16, min(cap, triton.next_power_of_2(dim)))


def precision(dtype):
    """tl.dot input precision for float32 operands: tf32 exactly when torch's own float32 GEMMs use it
    (torch.backends.cuda.matmul.allow_tf32, default False); other dtypes ignore it."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def check_sizes(B, widths, weights):
    """Refuse shapes whose int32 in-step offsets would overflow: B rows of each per-step width, and
    each weight matrix. widths: ints; weights: tensors or None."""
    too_big = [w for w in widths if B * w > _INT32_MAX] + [w.numel() for w in weights if w is not None
                                                            and w.numel() > _INT32_MAX]
    if too_big:
        raise RuntimeError(
            f"fusedrnn triton backend: batch {B} with per-step widths {widths} exceeds the kernels' int32 "
            f"in-step offsets (2**31 elements); use backend='reference' or split the batch"
        )


def dense(*tensors):
    """Contiguous versions (no copy when already contiguous); None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def stand_in(t, other):
    """A pointer argument for an optional tensor: t, or when it is None `other`, which the kernel will not
    read (the flag that guards t is off)."""
    return other if t is None else t


def state_buffer(init):
    """fp32 ping-pong buffer (2, *init.shape) for a state carried across steps: step s reads plane s % 2 and
    writes the other, so no element is read and written in the same step. Plane 0 holds init."""
    buf = init.new_empty((2, *init.shape), dtype=torch.float32)
    buf[0] = init
    return buf


def final_state(buf, T, dtype):
    """The state after T steps of a ``state_buffer``, as a fresh tensor of ``dtype``."""
    return buf[T % 2].to(dtype, copy=True)


def tuning(x, H):
    """The constexprs every kernel takes besides its flags: dot precision and tile sizes for x: (T, B, I)
    and H hidden units."""
    return {"PRECISION": precision(x.dtype), "BLOCK_B": BLOCK_B, "BLOCK_N": _block(H, MAX_BLOCK_N),
                "BLOCK_K": _block(H, MAX_BLOCK_K)}


def launch_options(dtype, capability):
    """Compiler options of a launch on a GPU of compute `capability` (major, minor). Both keep every kernel free
    of spills (no stack in the cubin: tests/test_triton_compile.py, under the newest triton and 3.6.0):

    - Software pipelining of the reduction loops (Triton's default 3 stages) stays only for half precision on
      sm_90: elsewhere the extra stages of operand tiles spilled registers (the float32 LSTM kernels 8-80 bytes
      on sm_90 where H or P is not a multiple of 16, the half GRU forward 16 bytes on sm_80).
    - A register budget (maxnreg: ptxas's .maxnreg): 128 per thread from sm_90 on, 168 on sm_80. Without one, ptxas
      picks a budget from its own occupancy heuristic and spills to meet it: triton 3.6.0's ptxas (12.8) held
      four float32 forward kernels for sm_90 at 64-80 registers with 8-16 bytes of stack (the lengths or per-row
      base pointers, loop invariants, stored once and reloaded from local memory every step), and the same PTX
      given .minnctapersm 1 (no occupancy goal) needs no stack; on sm_80 the LSTM forward kept 8 bytes at 128.
      The budgets are the largest that still fit 4 (sm_90) or 3 (sm_80) programs of 4 warps on an SM (64K
      registers): with 96 (5 per SM) the LSTM forward spills on sm_90, with 128 on sm_80. The persistent variant
      runs B/16 programs, one per SM up to B = 16 x SMs, so the budget costs it nothing there; the split variant
      loses resident programs only where it has more than 4 (3) per SM (B/16 x H/32 programs > 528 on an H100),
      a cost only a GPU can weigh against the spill's."""
    pipelined = dtype != torch.float32 and capability >= (9, 0)
    registers = 128 if capability >= (9, 0) else 168
    return {"num_warps": 4, "maxnreg": registers, **({} if pipelined else {"num_stages": 1})}


def split(x, H, P, cell):
    """Whether the split variant runs this layer (x: (T, B, I)): VARIANT when it forces one, else the planner's
    choice between the two variants' models on x's device."""
    if VARIANT not in VARIANTS:
        raise ValueError(f"FUSEDRNN_TRITON_VARIANT must be one of {VARIANTS}, got {VARIANT!r}")
    if VARIANT != "auto":
        return VARIANT == "split"
    return _split_planned(cell, *x.shape, H, P, x.dtype, x.device, torch.backends.cuda.matmul.allow_tf32)


@functools.lru_cache(maxsize=4096)
def _split_planned(cell, T, B, I, H, P, dtype, device, allow_tf32):
    """The planner's choice between the two variants (cached: a call is latency-bound, the model is not free)."""
    from .. import planner

    shape = planner.Shape.of(cell, T, B, I, H, P, 1, dtype, allow_tf32)
    device = planner.Device.of(device)
    return planner.step_us("triton_split", shape, device) < planner.step_us("triton", shape, device)


def launch(kernel, x, H, args, phases, variant_split, **flags):
    """The one place kernels start, on x's device (x: (T, B, I)). args: the kernel's tensor and size arguments
    in order, before its step range (s_begin, s_end), phase mask and span; phases: the step's phases in order,
    as (phase bit, width: H or P); flags: its constexpr switches. Persistent: one launch of one program per
    BLOCK_B rows over all steps and phases. Split: per step, one launch per phase over (batch tiles x
    ceil(width / BLOCK_N)) programs, each owning BLOCK_N units or outputs."""
    T, B = x.shape[0], x.shape[1]
    tiles = triton.cdiv(B, BLOCK_B)
    constexprs = {**tuning(x, H), **flags}
    options = launch_options(x.dtype, torch.cuda.get_device_capability(x.device) if x.is_cuda else (0, 0))
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device:
        block = constexprs["BLOCK_N"]
        if not variant_split:
            mask = sum(bit.value for bit, _ in phases)
            span = triton.cdiv(max(width for _, width in phases), block) * block  # all of every phase's width
            kernel[(tiles, 1)](*args, 0, T, mask, span, **constexprs, **options)
            return

        def steps():
            for s in range(T):
                for bit, width in phases:
                    kernel[(tiles, triton.cdiv(width, block))](*args, s, s + 1, bit.value, block, **constexprs,
                                                               **options)

        if x.is_cuda and not torch.cuda.is_current_stream_capturing():
            key = (kernel, x.device, T, tiles, tuple((bit.value, width) for bit, width in phases),
                   tuple(a.data_ptr() if torch.is_tensor(a) else a for a in args),
                   tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
            _graphed(key, steps)
        else:
            steps()


# The split variant's CUDA graphs: {launch key: graph, or None once the key has been seen}, least recent first.
# A key holds every argument of a call's launches, pointers included, so replaying its graph IS those launches.
_GRAPHS = collections.OrderedDict()
MAX_GRAPHS = 64


def _graphed(key, steps):
    """Run `steps` (a split-variant call's T x phases launches) from a CUDA graph when the same launches came
    before: the first time directly (that also compiles the kernels), the second time captured on a side stream
    and replayed, afterwards replayed: one graph launch instead of T x phases Python launches. A training loop
    sees the same pointers step after step (the caching allocator hands the same blocks back), so its calls hit."""
    if key not in _GRAPHS:
        steps()
        _GRAPHS[key] = None
    else:
        graph = _GRAPHS[key]
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    steps()
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(side)
            _GRAPHS[key] = graph  # only once captured: a failed capture leaves the key to be captured again
        graph.replay()
    _GRAPHS.move_to_end(key)
    while len(_GRAPHS) > MAX_GRAPHS:
        _GRAPHS.popitem(last=False)
