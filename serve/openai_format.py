"""Request parsing and OpenAI response shapes (completions with legacy logprobs, chat, SSE chunks)."""

from jinja2 import TemplateError

from .engine import EngineError

MAX_CHOICES = 256  # prompts x n per request; bounds the work one request can queue


def check_ids(ids: list[int], vocab_size: int, param: str = "prompt"):
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise EngineError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)


def completion_prompts(prompt, tok, vocab_size: int) -> list[tuple[list[int], str]]:
    """Normalize the four accepted prompt forms to [(token ids, prompt text)]."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise EngineError("prompt is empty", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tok.encode(p) if p else []
            text = p
        else:
            check_ids(p, vocab_size)
            ids, text = list(p), tok.decode(p)
        if not ids:
            raise EngineError("prompt is empty", param="prompt")
        out.append((ids, text))
    return out


def chat_prompt_ids(tok, messages, add_generation_prompt: bool) -> list[int]:
    if not tok.chat_template:
        raise EngineError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as e:
        raise EngineError(f"chat template failed: {e}", param="messages") from e
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise EngineError("the chat prompt is empty", param="messages")
    return ids


def check_choices(n_prompts: int, n: int):
    if n_prompts * n > MAX_CHOICES:
        raise EngineError(f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")


class LegacyLogprobs:
    """Accumulates the legacy completions `logprobs` object; text_offset indexes into the returned text."""

    def __init__(self, st, offset: int = 0):
        self.st, self.offset = st, offset
        self.obj = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_id: int, entry: dict | None) -> "LegacyLogprobs":
        s = self.st.token_str(token_id)
        self.obj["tokens"].append(s)
        self.obj["text_offset"].append(self.offset)
        self.offset += len(s)
        if entry is None:  # first prompt token: nothing predicts it
            self.obj["token_logprobs"].append(None)
            self.obj["top_logprobs"].append(None)
        else:  # the chosen token first so that a top entry with the same string wins (keeps max() honest)
            self.obj["token_logprobs"].append(entry["logprob"])
            self.obj["top_logprobs"].append({s: entry["logprob"],
                                             **{self.st.token_str(i): lp for i, lp in entry["top"]}})
        return self

    def take(self) -> dict:
        """The entries added since the last take (for stream chunks)."""
        out = self.obj
        self.obj = {k: [] for k in out}
        return out


def _usage(run) -> dict:
    out = sum(1 for evs in run.events for e in evs if "token" in e)
    return {"prompt_tokens": run.n_prompt, "completion_tokens": out, "total_tokens": run.n_prompt + out}


def completion_response(run, st, prompts, req, meta) -> dict:
    choices = []
    for i, evs in enumerate(run.events):
        ids, prompt_text = prompts[i // run.n]
        lp = LegacyLogprobs(st) if req.logprobs is not None else None
        text = prompt_text if req.echo else ""
        for ev in evs:
            if "prompt_logprobs" in ev and lp is not None:
                for tid, entry in zip(ids, ev["prompt_logprobs"]):
                    lp.add(tid, entry)
            if "token" in ev and lp is not None and "logprob" in ev:
                lp.add(ev["token"], ev["logprob"])
            text += ev.get("text", "")
        choices.append({"index": i, "text": text, "logprobs": lp.obj if lp else None,
                        "finish_reason": evs[-1]["finish_reason"]})
    return {"object": "text_completion", **meta, "choices": choices, "usage": _usage(run)}


async def _events(run):
    """(index, event) until every sequence finished; aborts/errors end the stream with an error chunk."""
    done = 0
    while done < len(run.seqs):
        i, ev = await run.next_event()
        run.events[i].append(ev)
        if ev.get("finish_reason") in ("abort", "error"):
            msg = "request cancelled: server shutting down" if ev["finish_reason"] == "abort" else ev.get("error")
            yield i, {"error": {"message": msg, "type": "server_error", "param": None,
                                "code": ev["finish_reason"]}}
            return
        done += "finish_reason" in ev
        yield i, ev


async def completion_stream(run, st, prompts, req, meta, include_usage: bool):
    base = {"object": "text_completion", **meta}
    lps = [LegacyLogprobs(st) if req.logprobs is not None else None for _ in run.seqs]
    echoed = [not req.echo] * len(run.seqs)
    async for i, ev in _events(run):
        if "error" in ev:
            yield ev
            return
        ids, prompt_text = prompts[i // run.n]
        text, lp = "", lps[i]
        if "prompt_logprobs" in ev:  # goes out with the next event of this choice, together with the prompt text
            if lp is not None:
                for tid, entry in zip(ids, ev["prompt_logprobs"]):
                    lp.add(tid, entry)
            continue
        if not echoed[i]:
            echoed[i], text = True, prompt_text
        if "token" in ev and lp is not None and "logprob" in ev:
            lp.add(ev["token"], ev["logprob"])
        text += ev.get("text", "")
        chunk = {"index": i, "text": text, "logprobs": lp.take() if lp else None,
                 "finish_reason": ev.get("finish_reason")}
        yield {**base, "choices": [chunk], **({"usage": None} if include_usage else {})}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(run)}


def _chat_logprobs(st, entries: list[dict]) -> dict:
    def item(i, lp):
        s = st.token_str(i)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(e["id"], e["logprob"]), "top_logprobs": [item(i, lp) for i, lp in e["top"]]}
                        for e in entries]}


def chat_response(run, st, meta) -> dict:
    choices = []
    for i, evs in enumerate(run.events):
        entries = [ev["logprob"] for ev in evs if "logprob" in ev]
        with_lp = run.seqs[i].params.logprobs is not None
        choices.append({"index": i, "message": {"role": "assistant", "content": "".join(e.get("text", "") for e in evs)},
                        "logprobs": _chat_logprobs(st, entries) if with_lp else None,
                        "finish_reason": evs[-1]["finish_reason"]})
    return {"object": "chat.completion", **meta, "choices": choices, "usage": _usage(run)}


async def chat_stream(run, st, meta, include_usage: bool):
    base = {"object": "chat.completion.chunk", **meta}
    extra = {"usage": None} if include_usage else {}
    for i in range(len(run.seqs)):
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}], **extra}
    async for i, ev in _events(run):
        if "error" in ev:
            yield ev
            return
        with_lp = run.seqs[i].params.logprobs is not None and "logprob" in ev
        delta = {"content": ev["text"]} if ev.get("text") or "finish_reason" not in ev else {}
        yield {**base, "choices": [{"index": i, "delta": delta,
                                    "logprobs": _chat_logprobs(st, [ev["logprob"]]) if with_lp else None,
                                    "finish_reason": ev.get("finish_reason")}], **extra}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(run)}
