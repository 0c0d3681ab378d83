"""Finds and loads the compiled kernels (built by setup.py) with ctypes; torch-free."""

import ctypes
import importlib.machinery
from pathlib import Path

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3, "avx2int": 4}
_NAME = "_xbit_cpu"
_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64


def _find() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / (_NAME + suffix)).is_file():
            return here / (_NAME + suffix)
    return None


def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why it is not available)."""
    path = _find()
    if path is None:
        return None, (f"compiled library {_NAME}*.so not found in {Path(__file__).resolve().parent} (no C++ compiler "
                      "at install time, or the build failed; reinstall with `pip install -v .` to see why)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"cannot load {path.name}: {e}"
    if not hasattr(lib, "xbit_cpu_dequantize"):  # built from older sources
        return None, f"{path.name} is out of date (no xbit_cpu_dequantize); reinstall the package to rebuild it"
    lib.xbit_cpu_plan.restype = ctypes.c_int
    lib.xbit_cpu_plan.argtypes = [_P, _P, _I64, _I32, _P, _P]  # bits, perm, K, group_size, seg_table, info
    lib.xbit_cpu_isa_supported.argtypes, lib.xbit_cpu_isa_supported.restype = [ctypes.c_int], ctypes.c_int
    lib.xbit_cpu_best_isa.argtypes, lib.xbit_cpu_best_isa.restype = [], ctypes.c_int
    lib.xbit_cpu_openmp.argtypes, lib.xbit_cpu_openmp.restype = [], ctypes.c_int
    lib.xbit_cpu_matmul.restype = ctypes.c_int
    lib.xbit_cpu_matmul.argtypes = [
        ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, _I64, _I64, _P,  # isa, threads, x, x_bf16, M, K, perm
        _P, _I64, _P, _P, _I64,  # qweight, nwords, scales, zeros, N
        _P, _I32, _I32, _I64, _I64,  # seg_table, nseg, group_size, ngroups, Kp
        _P, _I32, _P,  # signs, rot_block, y
    ]
    lib.xbit_cpu_dequantize.restype = ctypes.c_int
    lib.xbit_cpu_dequantize.argtypes = [
        ctypes.c_int, _I64, _P, _P, _I64, _P, _P, _I64,  # threads, K, perm, qweight, nwords, scales, zeros, N
        _P, _I32, _I32, _I64, _I64, _P, _I64, _P,  # seg_table, nseg, group_size, ngroups, Kp, rows, count, out
    ]
    lib.xbit_cpu_rotate.restype = ctypes.c_int
    lib.xbit_cpu_rotate.argtypes = [ctypes.c_int, _P, ctypes.c_int, _I64, _I64, _P, _I32, _P]
    return lib, ""
