"""Makes the plain `lm_eval --model xbit ...` work once xbit is installed, without an extra import.

lm-eval 0.4.x looks models up in a registry filled when `lm_eval.models` is imported, and has no entry-point
lookup for models. So the install drops a one-line `xbit_lm_eval.pth` into site-packages (see setup.py) that calls
`install()` at interpreter start. That only puts a tiny finder on `sys.meta_path`: nothing of lm-eval, torch or xbit
is imported until a process imports `lm_eval.models` itself; right after that module runs, "xbit" is registered as a
lazy placeholder for `eval.lm_eval_model:XbitLM`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

WATCHED = "lm_eval.models"


def _register_after(exec_module):
    def exec_then_register(module):
        exec_module(module)
        from eval.lm_eval_model import register

        register()

    return exec_then_register


class _RegisterXbitModel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _register_after(spec.loader.exec_module)
        return spec


def install() -> None:
    if WATCHED not in sys.modules and not any(isinstance(f, _RegisterXbitModel) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterXbitModel())
