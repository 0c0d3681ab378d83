"""Offline lm-eval tasks built from the real evaluation texts: YAML definitions here, data built into the cache.

    python -m eval.tasks.build                       # optional: the YAMLs build missing data on first use
    python -m eval.lm_eval_run --model xbit --model_args path=DIR --tasks xbit_offline --limit 100
    lm_eval --model hf --model_args pretrained=DIR --include_path eval/tasks --tasks xbit_offline
"""
