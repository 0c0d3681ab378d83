"""Build the offline lm-eval tasks from the real evaluation texts (never from calibration text).

    python -m eval.tasks.build                 # writes $XBIT_CACHE/tasks/seed1234/*.jsonl (default ~/.cache/xbit)
    python -m eval.tasks.build --seed 7 --lastword 2000 --nextsent 1000

Sources: State of the Union addresses 2000-2021 ("sotu-eval" of eval.assets) and Moby Dick. Addresses before
2000 calibrate the quantizers, so they are never read here. Output is a pure function of the source bytes, the
seed and the sizes: same inputs, same bytes.

Tasks (one file per task and corpus):
- xbit_lastword_{sotu,moby}: LAMBADA-style. A passage of whole sentences (at least --min-words words) ending in
  a word; the model scores the final word given the rest (loglikelihood: accuracy = greedy, perplexity of the word).
- xbit_nextsent_{sotu,moby}: multiple choice. A passage of whole sentences, then the real next sentence among
  three sentences drawn from elsewhere in the same corpus (another address; for the novel, at least 200 sentences
  away), of similar length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

VERSION = 1
SOURCES = {"sotu": "sotu-eval", "moby": "moby"}  # task corpus -> eval.assets split; calibration never listed
DEFAULT_SEED = 1234
DEFAULT_SIZES = {"lastword": 1000, "nextsent": 500}
MIN_WORDS, MAX_WORDS = 60, 160
N_CHOICES = 4
MOBY_MIN_DISTANCE = 200  # sentences between a moby passage and its distractors

_SENT_END = re.compile(r"(?<=[.!?])[\"”’)\]]*\s+(?=[\"“‘(\[]?[A-Z])")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z][a-z]*(?:[-'’][a-z]+)*)[.!?][\"”’)]*$", re.S)


def task_names() -> list[str]:
    return [f"xbit_{kind}_{src}" for kind in DEFAULT_SIZES for src in SOURCES]


def default_dir(seed: int = DEFAULT_SEED) -> Path:
    from eval.assets import cache_dir

    return cache_dir() / "tasks" / f"v{VERSION}-seed{seed}"


def split_sentences(text: str) -> list[list[str]]:
    """Paragraphs (blank-line separated, whitespace normalised) as lists of sentences."""
    out = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = " ".join(para.split())
        if para:
            out.append([s.strip() for s in _SENT_END.split(para) if s.strip()])
    return out


def _documents(split: str) -> list[tuple[str, list[str]]]:
    """(file name, sentences in order) per document of a split; paragraphs are joined inside a document."""
    from eval.assets import text_files

    docs = []
    for path in sorted(text_files(split), key=lambda p: p.name):
        paras = split_sentences(path.read_text(encoding="utf-8"))
        docs.append((path.name, [s for p in paras for s in p]))
    return docs


def _words(s: str) -> int:
    return len(s.split())


def _passage_before(sents: list[str], end: int, min_words: int, max_words: int) -> int | None:
    """Start index j so that sents[j:end+1] has min..max words, or None."""
    total, j = 0, end
    while j >= 0:
        total += _words(sents[j])
        if total >= min_words:
            return j if total <= max_words else None
        j -= 1
    return None


def _lastword_rows(docs, n: int, rng: random.Random, min_words: int, max_words: int) -> list[dict]:
    cands = []
    for d, (name, sents) in enumerate(docs):
        for i, s in enumerate(sents):
            m = _LAST_WORD.match(s)
            if not m or len(m.group(2)) < 2:
                continue
            j = _passage_before(sents, i, min_words, max_words)
            if j is not None:
                cands.append((d, j, i))
    rng.shuffle(cands)
    rows = []
    for d, j, i in cands[:n]:
        name, sents = docs[d]
        m = _LAST_WORD.match(sents[i])
        context = " ".join(sents[j:i] + [m.group(1)])
        rows.append({"context": context, "target": " " + m.group(2), "source": name, "sentence": i})
    return rows


def _nextsent_rows(docs, n: int, rng: random.Random, min_words: int, max_words: int) -> list[dict]:
    pool = [(d, i, s) for d, (_, sents) in enumerate(docs) for i, s in enumerate(sents) if 5 <= _words(s) <= 60]
    cands = []
    for d, (_, sents) in enumerate(docs):
        for i in range(len(sents) - 1):
            if 5 <= _words(sents[i + 1]) <= 60:
                j = _passage_before(sents, i, min_words, max_words)
                if j is not None:
                    cands.append((d, j, i))
    rng.shuffle(cands)
    rows = []
    for d, j, i in cands:
        if len(rows) == n:
            break
        name, sents = docs[d]
        answer = sents[i + 1]
        lo, hi = _words(answer) / 1.5, _words(answer) * 1.5
        far = (lambda e: e[0] != d) if len(docs) > 1 else (lambda e: abs(e[1] - i) >= MOBY_MIN_DISTANCE)
        options = [e for e in pool if far(e) and lo <= _words(e[2]) <= hi and e[2] != answer]
        if len(options) < N_CHOICES - 1:
            continue
        distractors = []
        for e in rng.sample(options, min(len(options), 4 * N_CHOICES)):
            if e[2] not in distractors:
                distractors.append(e[2])
            if len(distractors) == N_CHOICES - 1:
                break
        if len(distractors) < N_CHOICES - 1:
            continue
        choices = distractors + [answer]
        rng.shuffle(choices)
        rows.append({"context": " ".join(sents[j:i + 1]), "choices": choices, "label": choices.index(answer),
                     "source": name, "sentence": i})
    return rows


def _seed_for(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:8], "little")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def build(out_dir: str | Path | None = None, seed: int = DEFAULT_SEED, sizes: dict | None = None,
          min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> Path:
    """Write every task's jsonl and a manifest.json into out_dir; returns out_dir."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out = Path(out_dir) if out_dir is not None else default_dir(seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"version": VERSION, "seed": seed, "sizes": sizes, "min_words": min_words, "max_words": max_words,
                "sources": {}, "tasks": {}}
    for src, split in SOURCES.items():
        docs = _documents(split)
        manifest["sources"][src] = {"split": split, "files": [name for name, _ in docs]}
        for kind, make in (("lastword", _lastword_rows), ("nextsent", _nextsent_rows)):
            task = f"xbit_{kind}_{src}"
            rows = make(docs, sizes[kind], random.Random(_seed_for(seed, task)), min_words, max_words)
            if not rows:
                raise ValueError(f"{task}: no passage qualifies (text too short?)")
            text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
            _write_atomic(out / f"{task}.jsonl", text)
            manifest["tasks"][task] = {"rows": len(rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def load_rows(task: str, seed: int = DEFAULT_SEED, data_dir: str | Path | None = None) -> list[dict]:
    """Rows of one task, building the task files first if they are missing."""
    if task not in task_names():
        raise ValueError(f"unknown offline task {task!r}; choose from {', '.join(task_names())}")
    folder = Path(data_dir) if data_dir else default_dir(seed)
    path = folder / f"{task}.jsonl"
    if not path.is_file() or not (folder / "manifest.json").is_file():
        build(folder, seed=seed)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.tasks.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: <cache>/tasks/v1-seed<SEED>)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--lastword", type=int, default=DEFAULT_SIZES["lastword"], help="passages per corpus")
    p.add_argument("--nextsent", type=int, default=DEFAULT_SIZES["nextsent"], help="questions per corpus")
    args = p.parse_args(argv)
    try:
        out = build(args.out, seed=args.seed, sizes={"lastword": args.lastword, "nextsent": args.nextsent})
    except (ValueError, OSError) as e:
        print(f"eval.tasks.build: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    for task, info in manifest["tasks"].items():
        print(f"{task:<22} {info['rows']:>5} rows  sha256 {info['sha256'][:16]}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
