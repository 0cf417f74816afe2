"""Build and load the fused C kernels of ``_native.c`` and ``_native_bc.c`` (CPU,
float32/float64).

No build step at install time: the source ships with the package and is compiled on first use
with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``; about a second) into a
per-user cache, ``$AN_SEARCH_CACHE`` or ``~/.cache/an_search``, keyed by the source, the
flags and the CPU, written to a temporary file and renamed. Loaded with :mod:`ctypes`; its
OpenMP calls share the runtime torch already loaded. Without a compiler, or with
``AN_SEARCH_NATIVE=0``, :func:`library` returns None and callers use the stock-ATen path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from an_search._atomic import replacing

__all__ = [
    "NATIVE_DTYPES",
    "HeadSpec",
    "as_layout_of",
    "channels_last_map",
    "kernel_for",
    "library",
    "native_affine",
    "native_affine_grad",
    "native_available",
    "native_moments",
    "native_moments_cl",
    "native_row_dots",
    "native_cl_streams",
    "native_eval_ahead",
    "native_eval_rows_per_group",
    "native_eval_streams",
    "native_streams",
    "plain_tensors",
    "unavailable_reason",
]

NATIVE_DTYPES = (torch.float32, torch.float64)  # what the C kernels take
_SOURCES = [Path(__file__).with_name(n) for n in ("_native.c", "_native_bc.c", "_native_cl.c")]
_HEADERS = [Path(__file__).with_name(n) for n in ("_native_vec.h", "_native_head.h")]  # (key)
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


class HeadSpec(ctypes.Structure):
    """Mirror of ``an_head`` in ``_native.c``."""

    _fields_ = [
        ("pool", ctypes.c_int),
        ("pool_eps", ctypes.c_double),
        ("layers", ctypes.c_int),
        ("hidden", ctypes.c_long),
        ("k", ctypes.c_long),
        ("w1", ctypes.c_void_p),
        ("s1", ctypes.c_void_p),
        ("b1", ctypes.c_void_p),
        ("w2", ctypes.c_void_p),
        ("s2", ctypes.c_void_p),
        ("b2", ctypes.c_void_p),
        ("gn", ctypes.c_int),
        ("gn_eps", ctypes.c_double),
        ("gn_w", ctypes.c_void_p),
        ("gn_b", ctypes.c_void_p),
        ("gate", ctypes.c_int),
        ("mix", ctypes.c_void_p),
    ]


def _cache_dir() -> Path:
    env = os.environ.get("AN_SEARCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "an_search"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _cpu_key() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    sources = [path.read_bytes() for path in (*_SOURCES, *_HEADERS)]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(_FLAGS).encode(), _cpu_key().encode()]))
    target = _cache_dir() / f"an_native-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target, suffix=".so") as tmp:
        cmd = [cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_double
    lib.an_streams.argtypes, lib.an_streams.restype = [p, i64, i64, i64], i32
    lib.an_eval_streams.argtypes, lib.an_eval_streams.restype = [p, i64, i64, i64, i64], i64
    lib.an_eval_ahead.argtypes, lib.an_eval_ahead.restype = [i64], i32
    lib.an_cl_streams.argtypes, lib.an_cl_streams.restype = [p, i64, i64, i64], i32
    lib.an_eval_rows_per_group.argtypes = [i64, i64, i64]
    lib.an_eval_rows_per_group.restype = i64
    for suffix in ("f32", "f64"):
        getattr(lib, f"an_moments_{suffix}").argtypes = [p, i64, i64, p, p, i32]
        getattr(lib, f"an_row_path_{suffix}").argtypes = [p, i64]
        getattr(lib, f"an_affine_{suffix}").argtypes = [p, p, p, p, i64, i64, i32]
        getattr(lib, f"an_affine_grad_{suffix}").argtypes = [p, p, p, p, p, p, i64, i64, i32]
        getattr(lib, f"an_row_dots_{suffix}").argtypes = [p, p, p, p, i64, i64, i32]
        tail_fwd = getattr(lib, f"an_tail_fwd_{suffix}")
        tail_bwd = getattr(lib, f"an_tail_bwd_{suffix}")
        tail_fwd.argtypes = [p, p, p, p, p, i64, i64, i64, f64, p, p, p, p, p, p]
        tail_bwd.argtypes = [p, p, p, p, p, p, p, p, p, p, i64, i64, i64, p, p, p, p, p]
        tail_fwd.restype = tail_bwd.restype = i32
        linbn_fwd = getattr(lib, f"an_linbn_fwd_{suffix}")
        linbn_bwd = getattr(lib, f"an_linbn_bwd_{suffix}")
        linbn_fwd.argtypes = [p, p, p, p, i64, i64, i64, f64, p, p, p, p, p]
        linbn_bwd.argtypes = [p, p, p, p, p, p, i64, i64, i64, p, p, p, p]
        linbn_fwd.restype = linbn_bwd.restype = i32
        getattr(lib, f"an_meanstd_fwd_{suffix}").argtypes = [p, p, i64, f64, f64, p, p]
        getattr(lib, f"an_meanstd_bwd_{suffix}").argtypes = [p, p, p, i64, f64, p, p]
        getattr(lib, f"an_site_coefs_{suffix}").argtypes = [p, p, p, p, p, i64, i64, f64, i32, p, p]
        getattr(lib, f"an_running_{suffix}").argtypes = [p, p, p, p, p, i64, f64, f64]
        for layout in ("", "_cl"):  # (B, C, n) maps; channels-last (B, n, C) ones
            evaluate = getattr(lib, f"an_eval{layout}_{suffix}")
            evaluate.argtypes = [ctypes.POINTER(HeadSpec), p, p, i64, i64, i64, i32]
            evaluate.restype = i32
        moments_cl = getattr(lib, f"an_moments_cl_{suffix}")
        moments_cl.argtypes, moments_cl.restype = [p, i64, i64, i64, p, p, i32], i32
        getattr(lib, f"an_affine_cl_{suffix}").argtypes = [p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"an_affine_grad_cl_{suffix}").argtypes = [p, p, p, p, p, p, i64, i64, i64,
                                                                i32]  # fmt: skip
        getattr(lib, f"an_row_dots_cl_{suffix}").argtypes = [p, p, p, p, i64, i64, i64, i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first call; None where they cannot be had."""
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" not in _STATE:
            lib, reason = None, None
            cc = _compiler()
            if os.environ.get("AN_SEARCH_NATIVE", "1") == "0":
                reason = "disabled by AN_SEARCH_NATIVE=0"
            elif cc is None:
                reason = "no C compiler found (set CC)"
            else:
                try:
                    lib = _bind(ctypes.CDLL(str(_build(cc))))
                except (OSError, subprocess.SubprocessError) as exc:
                    reason = f"building the native kernels failed: {exc}"
            _STATE["reason"], _STATE["lib"] = reason, lib
    return _STATE["lib"]  # type: ignore[return-value]


@torch.compiler.assume_constant_result
def native_available() -> bool:
    """Whether :func:`library` loads (a constant for torch.compile)."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`library` is None (None when the kernels are loaded)."""
    library()
    return _STATE.get("reason")  # type: ignore[return-value]


def _suffix(dtype: torch.dtype) -> str | None:
    return {torch.float32: "f32", torch.float64: "f64"}.get(dtype)


def plain_tensors(*tensors: torch.Tensor) -> bool:
    """True when C may read these tensors' memory behind torch's back: plain CPU tensors and
    no dispatch mode active (FlopCounterMode, FakeTensorMode, ... must see every op)."""
    if torch._C._len_torch_dispatch_stack() or torch.compiler.is_compiling():
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
               for t in tensors)  # fmt: skip


def native_moments(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row mean and biased variance of a contiguous CPU (B, C, n) tensor, one read.

    Returns None where the kernels do not apply (no library, dtype, layout, device).
    """
    fn = _kernel("an_moments", x3)
    if fn is None:
        return None
    b, c, n = x3.shape
    mean = x3.new_empty(b, c)
    var = x3.new_empty(b, c)
    fn(x3.data_ptr(), b * c, n, mean.data_ptr(), var.data_ptr(), torch.get_num_threads())
    return mean, var


def native_moments_cl(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-(sample, channel) mean and biased variance of a contiguous CPU (B, n, C) tensor
    (a channels-last map's memory), one read (``_native_cl.c``); None where n/a."""
    fn = _kernel("an_moments_cl", x3)
    if fn is None:
        return None
    b, n, c = x3.shape
    mean, var = x3.new_empty(b, c), x3.new_empty(b, c)
    if fn(x3.data_ptr(), b, n, c, mean.data_ptr(), var.data_ptr(), torch.get_num_threads()):
        raise MemoryError("AttentiveNorm moments: no memory for the kernel's workspace")
    return mean, var


def _kernel(name: str, *maps: torch.Tensor) -> object | None:
    """The kernel ``name`` for these feature maps (same shape, contiguous CPU f32/f64)."""
    return None if maps[0].numel() == 0 else kernel_for(name, maps)


def kernel_for(name: str, *groups: tuple[torch.Tensor, ...]) -> object | None:
    """Kernel ``name`` where every tensor is a contiguous plain CPU tensor of the first one's
    dtype (float32/float64) and the tensors of each group share a shape; else None."""
    lib = library()
    first = groups[0][0]
    suffix = _suffix(first.dtype)
    if lib is None or suffix is None or not plain_tensors(*(t for g in groups for t in g)):
        return None
    for group in groups:
        for t in group:
            if t.dtype != first.dtype or t.shape != group[0].shape or not t.is_contiguous():
                return None
    return getattr(lib, f"{name}_{suffix}")


def _rows(x: torch.Tensor, *coefs: torch.Tensor) -> list[torch.Tensor] | None:
    """Per-row coefficients flattened, contiguous, in ``x``'s dtype; None if they don't fit."""
    rows = coefs[0].numel()
    if any(t.numel() != rows for t in coefs) or x.numel() % max(rows, 1):
        return None
    return [t.reshape(rows).to(x.dtype).contiguous() for t in coefs]


def channels_last_map(x: torch.Tensor) -> bool:
    """A (B, C, *) map whose memory is (B, *, C), dense, and not also contiguous: the layout of
    the channels-last kernels (``_native_cl.c``): 4d/5d memory formats, a transposed 3d map."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def as_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (``ref``'s shape) in ``ref``'s layout, for the kernels: contiguous where ``ref``
    is, else with ``ref``'s strides; itself where it already is, else a copy."""
    if ref.is_contiguous():
        return t.contiguous()
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def _pass(name: str, rows: int, *maps: torch.Tensor) -> tuple[object, tuple[int, ...]] | None:
    """The pass ``name`` over these same-shaped (B, C, *) maps with ``rows`` per-row
    coefficients, and its size arguments: the row-wise kernel and (rows, n) for contiguous
    maps, the channels-last one (``_native_cl.c``) and (B, n, C) for channels-last maps of one
    layout (rows = B * C); None where neither applies. The two take the same arguments but
    the sizes."""
    x = maps[0]
    if rows <= 0 or x.numel() % rows:
        return None
    fn = _kernel(name, *maps)
    if fn is not None:
        return fn, (rows, x.numel() // rows)
    lib, suffix = library(), _suffix(x.dtype)
    if lib is None or suffix is None or not channels_last_map(x) or not plain_tensors(*maps):
        return None
    if any(t.shape != x.shape or t.stride() != x.stride() or t.dtype != x.dtype for t in maps):
        return None
    b, c = x.shape[0], x.shape[1]
    if b * c != rows:
        return None
    return getattr(lib, f"{name}_cl_{suffix}"), (b, x.numel() // rows, c)


def native_affine(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """``x * a + t`` per (sample, channel) row of a (B, C, *) tensor, contiguous or
    channels-last (the output keeps the layout); None where n/a."""
    coefs = _rows(x, a, t)
    kernel = None if coefs is None else _pass("an_affine", coefs[0].numel(), x)
    if kernel is None:
        return None
    y = torch.empty_like(x)
    kernel[0](x.data_ptr(), coefs[0].data_ptr(), coefs[1].data_ptr(), y.data_ptr(), *kernel[1],
              torch.get_num_threads())  # fmt: skip
    return y


def native_affine_grad(
    g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> torch.Tensor | None:
    """``g * a + x * c + d`` per row, one pass (AttentiveNorm's input gradient), contiguous or
    channels-last maps; None if n/a."""
    coefs = _rows(x, a, c, d)
    kernel = None if coefs is None else _pass("an_affine_grad", coefs[0].numel(), x, g)
    if kernel is None:
        return None
    y = torch.empty_like(x)
    kernel[0](g.data_ptr(), x.data_ptr(), *(t.data_ptr() for t in coefs), y.data_ptr(),
              *kernel[1], torch.get_num_threads())  # fmt: skip
    return y


def native_row_dots(
    g: torch.Tensor, x: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row ``sum(g * x)`` and ``sum(g)`` over ``rows`` equal rows (B * C of channels-last
    maps), one pass; None if n/a."""
    kernel = _pass("an_row_dots", rows, x, g)
    if kernel is None:
        return None
    sgx, sg = x.new_empty(rows), x.new_empty(rows)
    kernel[0](g.data_ptr(), x.data_ptr(), sgx.data_ptr(), sg.data_ptr(), *kernel[1],
              torch.get_num_threads())  # fmt: skip
    return sgx, sg


def native_streams(y: torch.Tensor) -> bool:
    """Whether the kernels write ``y``, a (B, C, *) output, with streaming stores (large
    outputs whose rows are whole cache lines, on AVX2 builds; see ``_native.c``)."""
    lib = library()
    if lib is None or y.dim() < 2 or y.numel() == 0:
        return False
    rows = y.shape[0] * y.shape[1]
    return bool(lib.an_streams(y.data_ptr(), rows, y.numel() // rows, y.element_size()))


def native_cl_streams(y: torch.Tensor) -> bool:
    """Whether the channels-last eval kernel writes ``y``, a (B, C, *) channels-last output,
    with streaming stores (see ``_native_cl.c``)."""
    lib = library()
    if lib is None or y.dim() < 2 or y.numel() == 0:
        return False
    return bool(lib.an_cl_streams(y.data_ptr(), y.numel(), y.shape[1], y.element_size()))


def native_eval_streams(y: torch.Tensor) -> int:
    """Rows per streamed run with which the eval kernel writes ``y``, a (B, C, *) output (8, or
    16 for float32 rows of odd length); 0 where it uses plain stores (see ``_native.c``)."""
    lib = library()
    if lib is None or y.dim() < 2 or y.numel() == 0:
        return 0
    b, c = y.shape[0], y.shape[1]
    return int(lib.an_eval_streams(y.data_ptr(), b, c, y.numel() // (b * c), y.element_size()))


def native_eval_ahead(sample_bytes: int) -> bool:
    """Whether the eval kernel reads the next sample while it writes this one, for samples
    of ``sample_bytes`` (see ``eval_ahead`` in ``_native.c``)."""
    lib = library()
    return lib is not None and bool(lib.an_eval_ahead(sample_bytes))


def native_eval_rows_per_group(channels: int, n: int, itemsize: int) -> int:
    """Rows of a sample the eval kernel takes per step (outputs not streamed): the whole
    sample where it is small, else 8 (see ``eval_rows_per_group`` in ``_native.c``); 0
    without the kernels."""
    lib = library()
    return 0 if lib is None else int(lib.an_eval_rows_per_group(channels, n, itemsize))
