"""The offline task builder: deterministic, evaluation text only, and loadable by lm-eval."""

import json
import random

import pytest

from tests.tiny import WORDS

CALIB_MARK = "calibmarker"


def _sentence(rng, mark=None):
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    if mark:
        words.insert(rng.randrange(len(words)), mark)
    words.append(rng.choice([w for w in WORDS if len(w) > 2]))
    return words[0].capitalize() + " " + " ".join(words[1:]) + "."


def fake_corpus(root, n_moby=600):
    """A fake XBIT_CACHE: sotu addresses 1995-2004 (before 2000 marked as calibration) and a moby data.txt."""
    rng = random.Random(0)
    sotu = root / "sotu"
    sotu.mkdir(parents=True)
    for year in range(1995, 2005):
        mark = CALIB_MARK if year < 2000 else None
        paras = [" ".join(_sentence(rng, mark) for _ in range(rng.randint(3, 7))) for _ in range(25)]
        (sotu / f"{year}_some_president_x.txt").write_text("\n\n".join(paras) + "\n")
    moby = root / "moby"
    moby.mkdir()
    sents = [_sentence(rng) for _ in range(n_moby)]
    text = "\n\n".join(" ".join(sents[i:i + 5]) for i in range(0, n_moby, 5))
    (moby / "data.txt").write_text("CHAPTER 1. Loomings.\n\n" + text + "\n")
    return root


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    root = fake_corpus(tmp_path / "cache")
    monkeypatch.setenv("XBIT_CACHE", str(root))
    return root


SIZES = {"lastword": 40, "nextsent": 30}


def test_build_is_deterministic_and_seeded(corpus, tmp_path):
    from eval.tasks.build import build, task_names

    a = build(tmp_path / "a", seed=5, sizes=SIZES)
    b = build(tmp_path / "b", seed=5, sizes=SIZES)
    c = build(tmp_path / "c", seed=6, sizes=SIZES)
    for task in task_names():
        assert (a / f"{task}.jsonl").read_bytes() == (b / f"{task}.jsonl").read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert any((a / f"{t}.jsonl").read_bytes() != (c / f"{t}.jsonl").read_bytes() for t in task_names())


def test_never_draws_from_calibration_text(corpus, tmp_path):
    from eval.tasks.build import build, task_names

    out = build(tmp_path / "t", seed=1, sizes=SIZES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(int(f[:4]) >= 2000 for f in manifest["sources"]["sotu"]["files"])
    for task in task_names():
        text = (out / f"{task}.jsonl").read_text()
        assert text.strip()
        assert CALIB_MARK not in text
        for row in map(json.loads, text.splitlines()):
            assert row["source"] == "data.txt" or int(row["source"][:4]) >= 2000


def test_rows_are_well_formed(corpus, tmp_path):
    from eval.tasks.build import build

    out = build(tmp_path / "t", seed=1, sizes=SIZES)
    for src in ("sotu", "moby"):
        rows = [json.loads(x) for x in (out / f"xbit_lastword_{src}.jsonl").read_text().splitlines()]
        assert len(rows) == SIZES["lastword"]
        for r in rows:
            assert r["target"].startswith(" ") and r["target"].strip().isalpha()
            assert len(r["context"].split()) >= 50
        rows = [json.loads(x) for x in (out / f"xbit_nextsent_{src}.jsonl").read_text().splitlines()]
        assert len(rows) == SIZES["nextsent"]
        for r in rows:
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4
            # the answer really follows the context somewhere in the evaluation text
            assert r["choices"][r["label"]] not in r["context"]
        assert len({r["label"] for r in rows}) > 1


def test_lm_eval_loads_the_tasks(corpus):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_model import tasks_dir

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    tasks = manager.load_task_or_group(["xbit_lastword_sotu", "xbit_nextsent_moby"])
    flat = {getattr(t, "task_name", None) or t.config.task: t for t in _leaves(tasks)}
    lw, ns = flat["xbit_lastword_sotu"], flat["xbit_nextsent_moby"]
    doc = lw.test_docs()[0]
    assert lw.doc_to_target(doc).startswith(" ")
    doc = ns.test_docs()[0]
    assert len(ns.doc_to_choice(doc)) == 4
    assert (corpus / "tasks").is_dir()  # built into the cache on first use


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj
