"""Builds cpu_fallback's C++/OpenMP kernels as a plain shared library, loaded at run time with ctypes, and installs
the one-line .pth hook that registers `lm_eval --model xbit`.

Everything else about the package lives in pyproject.toml. No torch at build time. A missing compiler or a
failed build never fails the install: xbit then runs the PyTorch reference on CPU and warns once, naming why.
"""

import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from setuptools.errors import CompileError, ExecError, LinkError, PlatformError

SRC = "cpu_fallback/csrc"
HEADERS = [f"{SRC}/xbit_cpu.h", f"{SRC}/simd_impl.inc", f"{SRC}/byte_layout.h"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
COMMON = ["-std=c++17", "-O3", "-g0", "-fPIC"] + (["-DXBIT_HAVE_X86_SIMD"] if X86 else [])
# Each ISA gets its own translation unit and flags; api.cpp picks one at run time with __builtin_cpu_supports.
SOURCES = [("api.cpp", []), ("kernel_scalar.cpp", [])]
# Optional units: a compiler too old for their flags (gcc < 8 has no -mavx512vnni) builds the rest without them,
# and api.cpp gets the define that hides the path.
OPTIONAL = {"kernel_avx512vnni.cpp": "-DXBIT_NO_VNNI"}
if X86:
    SOURCES += [
        ("kernel_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
        # gcc 12 warns about its own _mm512_undefined_* idiom under -Wall (as maybe- or plainly uninitialized,
        # depending on what it inlines)
        ("kernel_avx512.cpp", ["-mavx512f", "-mavx2", "-mfma", "-mf16c", "-Wno-maybe-uninitialized",
                               "-Wno-uninitialized"]),
        # batch <= 4 GEMV on vpdpbusd (+ vpmultishiftqb/vpermb of VBMI); api.cpp checks all four features
        ("kernel_avx512vnni.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi", "-mavx2",
                                   "-mfma", "-mf16c", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]),
    ]


class BuildCpuKernels(build_ext):
    def run(self):
        try:
            super().run()
        except PlatformError as e:  # no usable compiler configured at all
            self.warn(f"cpu_fallback: C++ kernels not built ({e}); the PyTorch reference will run on CPU")

    def build_extension(self, ext):
        if self.compiler.compiler_type != "unix":
            self.warn(f"cpu_fallback: C++ kernels need gcc or clang, not {self.compiler.compiler_type}; skipped")
            return
        errors = []
        for openmp in (["-fopenmp"], []):  # without OpenMP the kernels still build, single-threaded
            try:
                objects, defines = [], []
                for name, flags in sorted(SOURCES, key=lambda s: s[0] == "api.cpp"):  # api.cpp last: the defines
                    try:
                        objects += self.compiler.compile([f"{SRC}/{name}"], output_dir=self.build_temp,
                                                         extra_postargs=COMMON + defines * (name == "api.cpp")
                                                         + flags + openmp, depends=HEADERS)
                    except CompileError as e:
                        if name not in OPTIONAL:
                            raise
                        self.warn(f"cpu_fallback: {name} not built ({e}); that code path is left out")
                        defines.append(OPTIONAL[name])
                self.compiler.link_shared_object(objects, self.get_ext_fullpath(ext.name), extra_postargs=openmp,
                                                 target_lang="c++")
                return
            except (CompileError, LinkError, ExecError, OSError) as e:
                errors.append(f"{' '.join(openmp) or 'no OpenMP'}: {e}")
        self.warn("cpu_fallback: C++ kernels not built (" + "; ".join(errors) + "); the PyTorch reference will run on CPU")


# One line run at interpreter start: makes `lm_eval --model xbit` resolvable (eval/lm_eval_plugin.py says how).
PTH_NAME = "xbit_lm_eval.pth"
PTH_LINE = 'import sys; exec("try:\\n import eval.lm_eval_plugin as p; p.install()\\nexcept Exception: pass")\n'


class BuildPyWithPth(build_py):
    """Also puts the .pth at the top of the wheel, i.e. into site-packages (regular and editable installs)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH_NAME)
        with open(target, "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithPth(editable_wheel):
    """`pip install -e .` builds a wheel of path hooks only (no build_py output): add the .pth line to it too."""

    def _select_strategy(self, *args, **kwargs):
        return _AlsoWritePth(super()._select_strategy(*args, **kwargs))


class _AlsoWritePth:
    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


setup(
    ext_modules=[Extension("cpu_fallback._xbit_cpu", sources=[f"{SRC}/{n}" for n, _ in SOURCES], depends=HEADERS)],
    cmdclass={"build_ext": BuildCpuKernels, "build_py": BuildPyWithPth,
              "editable_wheel": EditableWheelWithPth},
)
