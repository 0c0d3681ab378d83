"""`python -m eval.lm_eval_run ...`: lm-eval's own CLI with the "xbit" model and the offline tasks registered.

    python -m eval.lm_eval_run --model xbit --model_args path=DIR --tasks xbit_lastword_sotu,xbit_nextsent_moby \
        --limit 200 --batch_size 8
    python -m eval.lm_eval_run --model xbit --model_args path=DIR --tasks lambada_openai   # Hub tasks as usual

Every argument is lm-eval's (see `lm_eval run --help`). Differences: "xbit" is a known --model name, and
eval/tasks is passed as --include_path unless the user gives one (lm-eval takes a single folder there: to
use both, put a symlink to eval/tasks inside yours).
From Python with an in-memory model use `eval.lm_eval_model.run_lm_eval(model, tokenizer, tasks)`.
"""

from __future__ import annotations

import sys

from eval.lm_eval_model import register, tasks_dir


def _with_tasks_path(argv: list[str]) -> list[str]:
    argv = list(argv)
    ours = str(tasks_dir())
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if argv and argv[0] in ("ls", "validate", "run") or any(a in ("--model", "--tasks") for a in argv):
        argv += ["--include_path", ours]
    return argv


def main(argv: list[str] | None = None) -> int:
    register()
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = ["lm_eval", *_with_tasks_path(argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
