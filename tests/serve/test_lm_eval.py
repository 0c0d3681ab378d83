"""`lm_eval --model local-completions` against the real server equals in-process lm-eval (HFLM) on the same model."""

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]: needed by local-completions

QUESTIONS = [("The quick brown", [" fox", " dog", " step"], 0), ("To be or not to", [" be", " gold", " fox"], 0),
             ("All that glitters is not", [" gold", " lazy", " miles"], 0),
             ("A journey of a thousand", [" miles", " words", " dog"], 0),
             ("The lazy", [" dog", " question", " step"], 1), ("Numbers 0 1 2", [" 3", " 9", " a"], 2)]
TASKS = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
doc_to_target: {target}
{extra}
"""


def _write_tasks(d):
    mc = d / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (d / "tiny_mc.yaml").write_text(TASKS.format(
        name="serve_tiny_mc", data=mc, kind="multiple_choice", target="answer",
        extra='doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc'))
    (d / "tiny_gen.yaml").write_text(TASKS.format(
        name="serve_tiny_gen", data=mc, kind="generate_until", target='"{{choices[0]}}"',
        extra="generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
              "metric_list:\n  - metric: exact_match"))


def _samples(out_dir, task) -> list[dict]:
    path = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
    assert path, f"no samples for {task} in {out_dir}"
    return sorted((json.loads(ln) for ln in open(path[0])), key=lambda s: s["doc_id"])


def test_local_completions_equals_in_process(server, ref_model, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _write_tasks(tmp_path)
    tasks = ["serve_tiny_mc", "serve_tiny_gen"]
    out = tmp_path / "http"
    args = (f"model=tiny-xbit,base_url={server.url}/v1/completions,num_concurrent=2,max_retries=1,"
            "tokenized_requests=True,max_length=256")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
           "--tasks", ",".join(tasks), "--include_path", str(tmp_path), "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]

    model, tok = ref_model
    local = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=256),
                                    tasks=tasks, task_manager=TaskManager(include_path=str(tmp_path)),
                                    log_samples=True)
    for task in tasks:
        http = _samples(out, task)
        mine = sorted(local["samples"][task], key=lambda s: s["doc_id"])
        assert len(http) == len(mine) == len(QUESTIONS)
        for a, b in zip(http, mine):
            if task == "serve_tiny_mc":
                # logged samples hold the numbers as strings; the in-process ones as floats
                lls_a = [float(r[0][0]) for r in a["resps"]]
                lls_b = [float(r[0][0]) for r in b["resps"]]
                assert lls_a == pytest.approx(lls_b, abs=1e-3)
                assert [str(r[0][1]) for r in a["resps"]] == [str(r[0][1]) for r in b["resps"]]  # is_greedy
                assert a["acc"] == b["acc"]
            else:
                assert a["filtered_resps"] == b["filtered_resps"]
                assert a["exact_match"] == b["exact_match"]
