"""Dataset loaders named by the task YAMLs (`custom_dataset: !function xbit_tasks.NAME`).

lm-eval calls them with the task's metadata (plus --metadata from the command line): `xbit_seed` picks another
build, `xbit_data_dir` a folder written by `python -m eval.tasks.build --out`.
"""

from eval.tasks.build import DEFAULT_SEED, load_rows


def _dataset(task: str, xbit_seed: int = DEFAULT_SEED, xbit_data_dir: str | None = None, **_):
    import datasets

    rows = load_rows(task, seed=int(xbit_seed), data_dir=xbit_data_dir)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def lastword_sotu(**kw):
    return _dataset("xbit_lastword_sotu", **kw)


def lastword_moby(**kw):
    return _dataset("xbit_lastword_moby", **kw)


def nextsent_sotu(**kw):
    return _dataset("xbit_nextsent_sotu", **kw)


def nextsent_moby(**kw):
    return _dataset("xbit_nextsent_moby", **kw)
