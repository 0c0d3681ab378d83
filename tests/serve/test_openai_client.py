"""The real server, driven by the official `openai` client: completions, chat, streaming, logprobs, greedy parity."""

import concurrent.futures as cf

import pytest
import requests
import torch

PROMPTS = ["The quick brown fox", "To be or not", "A journey of a thousand miles begins", "Ünïcödé 🙂", "All"]


def generate(ref_model, ids: list[int], n: int) -> list[int]:
    model, _ = ref_model
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_models_and_health(server, client):
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny-xbit"]


def test_greedy_equals_generate(client, ref_model):
    _, tok = ref_model
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="tiny-xbit", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        want = generate(ref_model, tok.encode(prompt), 12)
        assert r.choices[0].text == tok.decode(want, skip_special_tokens=True)
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_concurrent_greedy_equals_generate(client, ref_model):
    """More requests than --max-batch, with different lengths: sequences join and leave the running batch."""
    _, tok = ref_model
    jobs = [(p, 5 + 7 * i) for i, p in enumerate(PROMPTS * 2)]

    def one(job):
        p, n = job
        return client.completions.create(model="tiny-xbit", prompt=p, max_tokens=n, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, jobs))
    for (p, n), text in zip(jobs, got):
        assert text == tok.decode(generate(ref_model, tok.encode(p), n), skip_special_tokens=True), (p, n)


def test_prompt_forms(client, ref_model):
    _, tok = ref_model
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    as_text = client.completions.create(model="tiny-xbit", prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    as_ids = client.completions.create(model="tiny-xbit", prompt=ids, max_tokens=5, temperature=0)
    one_ids = client.completions.create(model="tiny-xbit", prompt=ids[1], max_tokens=5, temperature=0)
    assert [c.text for c in as_text.choices] == [c.text for c in as_ids.choices]
    assert one_ids.choices[0].text == as_ids.choices[1].text
    assert as_ids.usage.prompt_tokens == sum(map(len, ids))


def test_streaming_matches_non_streaming(client):
    kw = dict(model="tiny-xbit", prompt=PROMPTS[0], max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_raw_sse_ends_with_done(server):
    r = requests.post(server.url + "/v1/completions", json={"prompt": "The", "max_tokens": 3, "stream": True},
                      stream=True, timeout=30)
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_seed_n_and_sampling(client):
    kw = dict(model="tiny-xbit", prompt="The", max_tokens=10, temperature=1.0, top_p=0.9, n=3, seed=7)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b and len(a) == 3 and len(set(a)) > 1  # reproducible, and the n choices differ


def test_stop_sequences(client):
    kw = dict(model="tiny-xbit", prompt=PROMPTS[0], max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[5:7]
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.text == full[:full.index(stop)] and r.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == r.text


def test_logprobs_echo_shape(client, ref_model):
    model, tok = ref_model
    prompt = PROMPTS[2]
    ids = tok.encode(prompt)
    r = client.completions.create(model="tiny-xbit", prompt=prompt, max_tokens=2, temperature=0, logprobs=3,
                                  echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 2 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs[1:]) and lp.text_offset == sorted(lp.text_offset)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    only_prompt = client.completions.create(model="tiny-xbit", prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    c = only_prompt.choices[0]
    assert c.text == prompt and c.logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert only_prompt.usage.completion_tokens == 0


def test_chat(client, ref_model):
    _, tok = ref_model
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "To be or not to be?"}]
    r = client.chat.completions.create(model="tiny-xbit", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(generate(ref_model, ids, 10), skip_special_tokens=True)
    stream = client.chat.completions.create(model="tiny-xbit", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    lp = client.chat.completions.create(model="tiny-xbit", messages=msgs, max_tokens=3, logprobs=True,
                                        top_logprobs=2).choices[0].logprobs
    assert len(lp.content) <= 3 and all(len(t.top_logprobs) == 2 for t in lp.content)


def test_tokenizer_endpoints(server, ref_model):
    _, tok = ref_model
    info = requests.get(server.url + "/tokenizer_info", timeout=5).json()
    assert info["eos_token"] == "</s>" and info["chat_template"]
    t = requests.post(server.url + "/tokenize", json={"prompt": "Hello wörld 🙂"}, timeout=5).json()
    assert t["tokens"] == tok.encode("Hello wörld 🙂") and t["count"] == len(t["tokens"])
    d = requests.post(server.url + "/detokenize", json={"tokens": t["tokens"]}, timeout=5).json()
    assert d["prompt"] == "Hello wörld 🙂"


def test_metrics(server, client):
    client.completions.create(model="tiny-xbit", prompt="The", max_tokens=2)
    text = requests.get(server.url + "/metrics", timeout=5).text
    for name in ("xbit_requests_total", "xbit_prompt_tokens_total", "xbit_generation_tokens_total",
                 "xbit_queue_length", "xbit_decode_batch_size_bucket", "xbit_time_to_first_token_seconds_bucket",
                 "xbit_generation_tokens_per_second"):
        assert name in text
