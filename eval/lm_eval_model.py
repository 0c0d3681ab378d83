"""lm-eval model "xbit": an xbit checkpoint folder (or an in-memory model) behind lm-eval's HFLM.

    python -m eval.lm_eval_run --model xbit --model_args path=DIR --tasks xbit_lastword_sotu --limit 100
    lm_eval --model xbit --model_args path=DIR --device cpu --tasks arc_easy   # plain lm-eval, once installed

HFLM does the request handling (loglikelihood, loglikelihood_rolling, generate_until); this class only loads the
model through `xbit.load`, so quantized linears are xbit modules and float folders load as usual.

Registration: lm-eval 0.4.x has no plugin entry point for models (its registry holds only the names listed in
lm_eval.models.MODEL_MAPPING plus whatever `@register_model` ran in the current process). `register()` adds "xbit"
as a lazy placeholder; the installed .pth hook (eval/lm_eval_plugin.py) calls it right after any process imports
lm_eval.models, `eval.lm_eval_run` calls it before handing over to lm-eval's own CLI, and
`run_lm_eval(model, tokenizer, tasks)` calls it for in-memory models from Python.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_NAME = "xbit"
_TARGET = "eval.lm_eval_model:XbitLM"


def register() -> None:
    """Make `--model xbit` resolvable in this process (idempotent, cheap: lm-eval imports us only when used)."""
    from lm_eval.api.registry import model_registry
    import lm_eval.models  # noqa: F401  (fills the registry with the built-in names first)

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_TARGET)


def _lazy_hflm():
    from lm_eval.models.huggingface import HFLM

    return HFLM


def _make_class():
    HFLM = _lazy_hflm()

    class XbitLM(HFLM):
        """HFLM over `xbit.load(path)`; `pretrained` may also be a model instance (then give `tokenizer`)."""

        def __init__(self, path: str | None = None, pretrained=None, tokenizer=None, device: str | None = None,
                     dtype: str | torch.dtype | None = None, batch_size: int | str = 8, **kwargs):
            if (path is None) == (pretrained is None):
                raise ValueError("xbit lm-eval model: give exactly one of path=DIR or pretrained=MODEL")
            if isinstance(pretrained, (str, Path)):
                path, pretrained = str(pretrained), None
            if path is not None:
                import xbit  # registers the quantizer
                from transformers import AutoTokenizer

                folder = Path(path).expanduser()
                if not (folder / "config.json").is_file():
                    raise FileNotFoundError(f"xbit lm-eval model: {path} is not a model folder (no config.json)")
                device = device or ("cuda" if torch.cuda.is_available() else "cpu")
                torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
                pretrained = xbit.load(str(folder), device=device, dtype=torch_dtype)
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(folder))
            elif tokenizer is None:
                raise ValueError("xbit lm-eval model: an in-memory model needs tokenizer=")
            if device is None:
                device = str(next(pretrained.parameters()).device)
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, device=device, batch_size=batch_size,
                             **kwargs)

    XbitLM.__name__ = XbitLM.__qualname__ = "XbitLM"
    XbitLM.__module__ = __name__
    return XbitLM


def __getattr__(name):  # XbitLM is built on first access so importing this module stays free of lm-eval
    if name == "XbitLM":
        cls = _make_class()
        globals()["XbitLM"] = cls
        return cls
    raise AttributeError(name)


def tasks_dir() -> Path:
    """Folder of the offline task definitions (pass to lm-eval as --include_path)."""
    return Path(__file__).resolve().parent / "tasks"


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | float | None = None, batch_size: int = 8,
                num_fewshot: int | None = None, include_path: str | Path | None = None,
                bootstrap_iters: int = 0, log_samples: bool = False, **kwargs) -> dict:
    """Evaluate an in-memory model (e.g. straight out of xbit.quantize) on lm-eval tasks.

    Our offline tasks (eval/tasks) are always included; Hub tasks work as usual where the Hub is reachable.
    Returns lm-eval's results dict (keys "results", "configs", ...).
    """
    import lm_eval

    lm = XbitLM_cls()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    paths = (str(tasks_dir()),) + ((str(include_path),) if include_path else ())
    manager = _task_manager(paths, include_defaults=not _only_offline(tasks))
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager, bootstrap_iters=bootstrap_iters,
                                   log_samples=log_samples, **kwargs)


_MANAGERS: dict = {}


def _only_offline(tasks) -> bool:
    """True when every task is one of ours: lm-eval's own index (some 20 s to build) is then not needed."""
    from eval.tasks.build import task_names

    return all(t in task_names() or t == "xbit_offline" for t in tasks)


def _task_manager(paths: tuple, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    key = (paths, include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(paths), include_defaults=include_defaults)
    return _MANAGERS[key]


def XbitLM_cls():  # noqa: N802  (the class, built on demand)
    return globals()["XbitLM"] if "XbitLM" in globals() else __getattr__("XbitLM")


def summarize_results(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (stderr and aliases dropped)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or "stderr" in key or not isinstance(value, (int, float)):
                continue
            row[key.split(",")[0]] = float(value)
        out[task] = row
    return out
