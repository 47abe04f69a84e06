"""Is an array finite? One read of it, no temporaries, and on the GPU no host wait in front of the kernel.

`xp.isfinite(x).all()` writes a boolean array the size of x and reads it again, and `bool(...)` waits for
the GPU once per array: on an H200 that was 0.74 ms of every flashkit.attention call at B=4, N=4096,
H*d=2048 (FACTS), a third of the kernel's time. Here a float is non-finite exactly when all its exponent
bits are set, so the GPU test reads each array once as raw 16-byte words.

On the GPU the public calls do not wait for the answer before launching the attention kernel:
`start(arrays, names)` enqueues ONE kernel over all the arrays (blockIdx.y picks the array) on a
high-priority side stream that first waits for the caller's stream (so it reads the inputs as the caller's
earlier work left them), and returns a `Pending`. The attention kernel is launched on the caller's stream
at once; `Pending.wait()` then waits for the check alone (its event), so the host wait overlaps the
attention kernel, and the caller raises (discarding the output) if an array was flagged. A kernel that
finds a bad word writes this call's serial number into page-locked host memory (`HostFlags`): no flag to
zero, no copy back, nothing written when all is well. flashkit.gpu.backward's in-kernel lse check reports
through the same words.

Tried and measured (H200, B*N = 16384, H*d = 2048, N 2048 and 4096, d 64 and 128, benchmarks/results/
gpu-overhead-h200-history5.json): a "thin" scan, one 32-thread block per SM with at most 32 registers and
cp.async into 24 KB of shared memory, meant to fit in what rung 7 leaves free (it holds 64,512 of the 65,536
registers) and so run beside the attention kernel instead of before it. It read at only ~0.3 TB/s (start +
wait 0.65 ms against 0.12 for this scan) and the public call took 1.32-3.03x the rung alone against this
scan's 1.00-1.17x: not kept. Each thread of this scan now keeps four 16-byte loads in flight (unrolled);
measured after that (gpu-overhead-h200-history6.json, N = 4096): start + wait 0.115-0.118 ms for the 201 MB of q, k, v
(0.12 before), and the public call 1.05-1.18x auto's rung alone; with check_finite=False 1.01-1.12x in that
run but 0.99-1.06x in the run before, so part of the gap is run-to-run noise. What is left is the scan's own
GPU time: its blocks take the SMs first (high priority) while the kernel waits, ~50-90 us of a 0.55-1.3 ms
rung 7 call. Reading 201 MB once more cannot cost less than ~48 us at this card's 4.2 TB/s, so within 3% of
a 0.55 ms kernel needs the reads overlapped with the kernel's compute (see benchmarks/NOTES-gpu.md, issue 11).

That is what rung 7 now does where it pays (`Fused`; kernels/input_check.cuh; flashkit.gpu.flash.check_columns):
the public call's check is a `Deferred` until the backend is known; a kernel that tests its own inputs claims it,
any other path starts this scan before its kernel. Measured on the H200 (benchmarks/gpu_input_check.py): public /
kernel 1.024-1.033x with the fused check, 1.037-1.063x with this scan in the same rounds, at N >= 4096.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

# Exponent bits by element size: float16 and bfloat16 differ, so 2-byte types are told apart by name.
EXPONENT_MASK = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000, "float64": 0x7FF0000000000000}
NEG_INF_BITS = {"float32": 0xFF800000, "float64": 0xFFF0000000000000}
MAX_ARRAYS = 6  # what one check launch takes (the backward's q, k, v, do, o and lse)

_SOURCE = r"""
// Every word of array y = blockIdx.y is tested: bad when all exponent bits are set (NaN or +-Inf), except
// -inf where allowed (a logsumexp of a row that saw no key). Words of W bytes are read 16 bytes at a time
// (uint4) when the array is 16-byte aligned and a whole number of uint4, else one word at a time. A bad
// array gets `serial` stored into flags[y], a word of page-locked host memory (unified addressing: the
// host pointer is valid on the device). Grid-stride: any n, any grid.x.
template <typename W>
__device__ bool scan(const W* x, long long n, W mask, W neg_inf) {
    long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    bool bad = false;
    const int per = 16 / sizeof(W);
    if (((size_t)x % 16 == 0) && (n % per == 0)) {
        const uint4* v = reinterpret_cast<const uint4*>(x);
        const long long n16 = n / per;
        long long i = tid;
        for (; i + 3 * stride < n16; i += 4 * stride) {  // four loads in flight before any test
            uint4 u[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) u[r] = v[i + r * stride];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const W* w = reinterpret_cast<const W*>(&u[r]);
#pragma unroll
                for (int k = 0; k < per; ++k) bad |= ((w[k] & mask) == mask) && (neg_inf == 0 || w[k] != neg_inf);
            }
        }
        for (; i < n16; i += stride) {
            uint4 u = v[i];
            const W* w = reinterpret_cast<const W*>(&u);
#pragma unroll
            for (int k = 0; k < per; ++k) bad |= ((w[k] & mask) == mask) && (neg_inf == 0 || w[k] != neg_inf);
        }
    } else {
        for (long long i = tid; i < n; i += stride) bad |= ((x[i] & mask) == mask) && (neg_inf == 0 || x[i] != neg_inf);
    }
    return bad;
}
extern "C" __global__ void nonfinite(
    unsigned long long p0, unsigned long long p1, unsigned long long p2,
    unsigned long long p3, unsigned long long p4, unsigned long long p5,
    long long n0, long long n1, long long n2, long long n3, long long n4, long long n5,
    unsigned long long m0, unsigned long long m1, unsigned long long m2,
    unsigned long long m3, unsigned long long m4, unsigned long long m5,
    unsigned long long i0, unsigned long long i1, unsigned long long i2,
    unsigned long long i3, unsigned long long i4, unsigned long long i5,
    int s0, int s1, int s2, int s3, int s4, int s5,
    unsigned long long flags, long long serial) {
    const int y = blockIdx.y;  // which array: picked by selects, not a local array (which would live in memory)
#define PICK(a) (y == 0 ? a##0 : y == 1 ? a##1 : y == 2 ? a##2 : y == 3 ? a##3 : y == 4 ? a##4 : a##5)
    const unsigned long long ptr = PICK(p), mask = PICK(m), neg_inf = PICK(i);
    const long long n = PICK(n);
    const int size = PICK(s);
#undef PICK
    bool bad;
    if (size == 2) bad = scan((const unsigned short*)ptr, n, (unsigned short)mask, (unsigned short)neg_inf);
    else if (size == 4) bad = scan((const unsigned int*)ptr, n, (unsigned int)mask, (unsigned int)neg_inf);
    else bad = scan((const unsigned long long*)ptr, n, mask, neg_inf);
    if (__any_sync(0xffffffff, bad) && (threadIdx.x % 32) == 0)
        reinterpret_cast<volatile long long*>(flags)[y] = serial;
}
"""
_STATE = threading.local()  # per host thread: its flags, serial numbers, side stream and events
FLAG_WORDS = 16  # [0, MAX_ARRAYS): the finiteness check's arrays; from LSE_WORD: flashkit.gpu.backward's lse check
LSE_WORD = 8
DONE_WORD = 12  # a fused check (`Fused`) stores its serial here once every block of its share has reported
FUSED_SHARE = 256 << 10  # bytes of q, k, v one block of a fused check tests (~8 us at its share of the DRAM)
FUSED_MAX_SHARE = 1 << 20  # more per block and the separate scan runs instead (the block would outlast its work)
FUSE = True  # False: the separate scan for every backend (benchmarks time both ways in one run: `separate_scan()`)


def _module():
    import cupy

    if getattr(_STATE, "module", None) is None:
        _STATE.module = cupy.RawModule(code=_SOURCE, options=("--std=c++17",)).get_function("nonfinite")
    return _STATE.module


class HostFlags:
    """FLAG_WORDS int64 words of page-locked host memory that kernels write and the host reads after an event.

    A kernel stores the call's serial number (never 0 or a value used before) into a word to say "flagged",
    so no word is ever reset; one per host thread and device (`host_flags()`), so concurrent callers in other
    threads cannot read each other's answers."""

    def __init__(self):
        import cupy

        self._mem = cupy.cuda.alloc_pinned_memory(8 * FLAG_WORDS)
        self.words = np.frombuffer(self._mem, np.int64, FLAG_WORDS)
        self.words[:] = 0
        self.device_ptr = np.uint64(self._mem.ptr)  # valid on the device too (unified virtual addressing)
        self.serial = 0
        self.stream = None
        self.events = {}

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def side_stream(self):
        """A non-blocking stream of the device's highest priority: the check's blocks are scheduled ahead of
        the attention kernel's as SMs free up, so its answer comes early instead of after the kernel."""
        import cupy

        if self.stream is None:
            # CUDA clamps a priority beyond the device's range to its greatest (H100/H200: -5; lower = higher)
            try:
                self.stream = cupy.cuda.Stream(non_blocking=True, priority=-1000)
            except TypeError:  # a CuPy without stream priorities: still beside, only not ahead
                self.stream = cupy.cuda.Stream(non_blocking=True)
        return self.stream

    def event(self, name):
        import cupy

        if name not in self.events:
            self.events[name] = cupy.cuda.Event(disable_timing=True)
        return self.events[name]

    @property
    def count(self):
        """A 64-bit word of device memory where the blocks of a fused check count themselves
        (kernels/input_check.cuh): (serial << 32) | blocks counted, so it is never reset."""
        import cupy

        if getattr(self, "_count", None) is None:
            self._count = cupy.zeros(1, cupy.uint64)
        return self._count


def host_flags() -> HostFlags:
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    table = getattr(_STATE, "flags", None)
    if table is None:
        table = _STATE.flags = {}
    if dev not in table:
        table[dev] = HostFlags()
    return table[dev]


class Pending:
    """A finiteness check in flight (or, on the CPU, done). `wait()` gives the index of the first flagged
    array, or None; `error()` the sentence to raise for it (naming the argument), or None."""

    def __init__(self, bad=None, flags=None, serial=0, event=None, n=0, names=None, allow_neg_inf=()):
        self._bad, self._flags, self._serial, self._event, self._n = bad, flags, serial, event, n
        self.names, self.allow_neg_inf = names, allow_neg_inf
        self._keep = ()

    def wait(self):
        if self._flags is not None:
            self._event.synchronize()  # the check's event: the attention kernel behind it keeps running
            words = self._flags.words
            self._bad = next((i for i in range(self._n) if words[i] == self._serial), None)
            self._flags, self._keep = None, ()
        return self._bad

    def error(self):
        i = self.wait()
        if i is None:
            return None
        name = self.names[i] if self.names else f"array {i}"
        if i in self.allow_neg_inf:
            return f"{name} contains NaN or +inf; a logsumexp is finite, or -inf for a row that saw no key"
        return f"{name} contains NaN or Inf; attention of non-finite input is undefined"


class Fused:
    """The NaN/Inf check of q, k, v done by the attention kernel itself (rung 7: kernels/input_check.cuh).

    `launch_args` go at the end of the kernel's arguments; `launched(stream)` records the kernel's end event
    (the backstop). `wait()` polls the page-locked DONE_WORD, which the kernel's last checking block writes long
    before the kernel ends, then reads the array words; it returns what `Pending.wait` returns, and `error()`
    the same sentences."""

    def __init__(self, arrays, shares, names, columns=1 << 30):
        flags = host_flags()
        self._flags, self._serial, self.shares, self.names = flags, flags.next_serial(), shares, names
        self.columns = columns  # the kernel's blocks with blockIdx.x < columns take the shares
        self._n, self._end, self._bad, self._done = len(arrays), None, None, False
        self.allow_neg_inf = ()
        self.backstop = False  # set by wait(): True when the kernel ended before the done word came (a diagnostic)

    @property
    def launch_args(self):
        i64, i32 = np.int64, np.int32
        return (i32(self.columns), i32(self.shares), self._flags.device_ptr, i32(DONE_WORD), i64(self._serial), self._flags.count)

    def launched(self, stream):
        self._end = self._flags.event("fused-end")
        self._end.record(stream)

    def wait(self):
        if not self._done:
            if self._end is None:
                raise RuntimeError("Fused.wait() before the kernel was launched (launched(stream) not called)")
            words, serial, end = self._flags.words, self._serial, self._end
            while words[DONE_WORD] != serial and not end.done:  # end.done: the backstop (cudaEventQuery)
                pass
            self.backstop = bool(words[DONE_WORD] != serial)
            self._bad = next((i for i in range(self._n) if words[i] == serial), None)
            self._done = True
        return self._bad

    error = Pending.error


def fused_shares(arrays, grid_blocks):
    """How many blocks of a grid of `grid_blocks` share a fused check of `arrays` (16-bit elements, each
    16-byte aligned and a whole number of 16-byte units), or 0 when the separate scan should run instead
    (the shares would exceed FUSED_MAX_SHARE bytes, or an array is not in whole units)."""
    if any(x.dtype.itemsize != 2 or x.data.ptr % 16 or x.nbytes % 16 for x in arrays):
        return 0
    total = sum(x.nbytes for x in arrays)
    shares = min(int(grid_blocks), max(1, -(-total // FUSED_SHARE)))
    return shares if total <= shares * FUSED_MAX_SHARE else 0


class Deferred:
    """validate.check(..., finite="async")'s check of q, k, v on the GPU before it starts: either the kernel
    that reads them tests them itself (`claim`, rung 7) or the separate scan runs (`start`); whichever comes
    first. `error()` waits for it, starting the scan first if nothing did (so no path can skip the check)."""

    def __init__(self, xp, arrays, dtype_names, names):
        self.xp, self.arrays, self.dtype_names, self.names = xp, tuple(arrays), tuple(dtype_names), names
        self._check = None

    def start(self):
        """Launch the separate scan now (before the attention kernel), unless a check is under way."""
        if self._check is None:
            self._check = start(self.xp, self.arrays, self.dtype_names, names=self.names)
        return self._check

    def claim(self, arrays, grid_blocks, columns=1 << 30):
        """For a kernel about to read `arrays` (the same objects) with `grid_blocks` blocks able to take a share
        (those with blockIdx.x < columns; 0: none, the kernel declines): a `Fused` check it runs (its
        launch_args, then launched(stream)), or None: then the separate scan has been started, or was already,
        and the kernel launches without it."""
        if self._check is None and FUSE:
            same = len(arrays) == len(self.arrays) and all(a is b for a, b in zip(arrays, self.arrays))
            shares = fused_shares(self.arrays, grid_blocks) if same else 0
            if shares:
                self._check = Fused(self.arrays, shares, self.names, columns)
                return self._check
        self.start()
        return None

    def wait(self):
        return self.start().wait()

    def error(self):
        return self.start().error()


@contextlib.contextmanager
def separate_scan():
    """Inside: every public call checks its inputs with the separate scan, as before rung 7 checked its own."""
    global FUSE
    was, FUSE = FUSE, False
    try:
        yield
    finally:
        FUSE = was


def start(xp, arrays, dtype_names, allow_neg_inf=(), names=None):
    """Begin checking `arrays` for NaN/Inf (one kernel launch on the GPU); returns a `Pending`.

    `dtype_names` names each array's element type (bfloat16 included, which CuPy may hold as 2-byte void);
    arrays whose index is in `allow_neg_inf` may hold -inf (float32/float64 only: the backward's lse).
    `names` (the arguments as the caller calls them) go into `Pending.error()`'s sentence. The arrays must
    stay alive and unmodified until `wait()` (the public calls wait before returning)."""
    if xp is np:
        for i, x in enumerate(arrays):
            ok = np.isfinite(x) if i not in allow_neg_inf else ~(np.isnan(x) | np.isposinf(x))
            if not ok.all():
                return Pending(bad=i, names=names, allow_neg_inf=allow_neg_inf)
        return Pending(names=names, allow_neg_inf=allow_neg_inf)
    import cupy

    if len(arrays) > MAX_ARRAYS:
        raise ValueError(f"one check takes at most {MAX_ARRAYS} arrays; got {len(arrays)}")
    flags = host_flags()
    serial = flags.next_serial()
    ptrs, ns, masks, infs, sizes = [], [], [], [], []
    keep = []
    for i, (x, name) in enumerate(zip(arrays, dtype_names)):
        x = cupy.ascontiguousarray(x)  # a view with strides is copied: the scan reads memory in order
        keep.append(x)
        ptrs.append(x.data.ptr)
        ns.append(x.size)
        masks.append(EXPONENT_MASK[name])
        infs.append(NEG_INF_BITS[name] if i in allow_neg_inf else 0)
        sizes.append(x.dtype.itemsize)
    n_arrays = len(arrays)
    pad = MAX_ARRAYS - n_arrays
    ptrs, ns, masks, infs, sizes = (v + [v[0] if v else 0] * pad for v in (ptrs, ns, masks, infs, sizes))
    ns = ns[:n_arrays] + [0] * pad  # the padding arrays are empty
    u64, i64, i32 = np.uint64, np.int64, np.int32
    args = (tuple(u64(p) for p in ptrs) + tuple(i64(n) for n in ns) + tuple(u64(m) for m in masks)
            + tuple(u64(v) for v in infs) + tuple(i32(z) for z in sizes) + (flags.device_ptr, i64(serial)))
    caller = cupy.cuda.get_current_stream()
    side = flags.side_stream()
    ready = flags.event("inputs")
    ready.record(caller)
    side.wait_event(ready)  # the inputs as the caller's stream leaves them
    threads = 128
    biggest = max(ns[:n_arrays]) if n_arrays else 0
    blocks = max(1, min(-(-biggest // (threads * 8 * 4)), 132 * 4))  # >= 4 words of 16 bytes per thread
    with side:
        _module()((blocks, n_arrays), (threads,), args)
    done = flags.event("finite")
    done.record(side)
    pending = Pending(flags=flags, serial=serial, event=done, n=n_arrays, names=names, allow_neg_inf=allow_neg_inf)
    pending._keep = keep  # copies made for the scan live until the check is done
    return pending


def first_nonfinite(xp, arrays, dtype_names, allow_neg_inf=()):
    """The index of the first of `arrays` holding NaN or Inf, or None (start + wait: one host wait)."""
    return start(xp, arrays, dtype_names, allow_neg_inf).wait()
