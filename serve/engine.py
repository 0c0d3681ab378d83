"""Continuous-batching generation engine: one background thread owns the model.

Each step the thread (1) drops cancelled sequences, (2) admits waiting requests up to `max_batch` (one prefill per
request; `n` choices share it), (3) runs one batched decode step for every active sequence. The batch's KV cache is
left-padded ([B, heads, T, dim] per layer, `pad[i]` leading empty columns in row i) with a per-row attention mask and
position ids, and is rebuilt only when membership changes. T never exceeds `max_seq_len`, so KV memory is bounded by
max_batch x max_seq_len tokens; requests that could outgrow it are refused before they are queued.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

log = logging.getLogger("serve.engine")
NEG_INF_CLAMP = -9999.0  # JSON has no -inf; OpenAI/vLLM clamp to this


class EngineError(Exception):
    """A request the engine refuses; `status` is the HTTP status the app answers with."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # number of top alternatives; None = no logprobs
    echo: bool = False  # prompt logprobs wanted (echo with logprobs)
    ignore_eos: bool = False


@dataclass
class Sequence:
    """One choice of one request. Events go to `sink(event)` (called from the engine thread)."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: object
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # detokenized output so far (after stop truncation when finished)
    sent: int = 0  # characters of `text` already emitted
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    prefix: object = None  # shared prefill result for the n choices of one request


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_seq_len: int | None = None, max_queue: int = 256,
                 metrics=None):
        self.model, self.tok, self.metrics = model, tokenizer, metrics
        self.device = next(model.parameters()).device
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_seq_len = min(max_seq_len or limit, limit)
        self.max_batch, self.max_queue = max_batch, max_queue
        # Quantized heads (XbitLinear, XbitTiedHead) have no .weight; every head has out_features.
        head = model.get_output_embeddings()
        self.vocab_size = getattr(head, "out_features", None) or model.config.get_text_config().vocab_size
        eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in eos + [tokenizer.eos_token_id] if e is not None}
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.active: list[Sequence] = []
        self.batch = None  # (seqs, keys, values, pad) for the current membership
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abort_at: float | None = None  # set by drain()
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)

    # ---- called from the event loop -------------------------------------------------------------
    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        """Stop after the current step; every unfinished sequence gets a final 'abort' event."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def drain(self, grace: float):
        """Shutdown has begun: refuse new requests now; abort whatever still runs `grace` seconds from now, so
        that its clients get a 503 or an SSE error event while their connections are still open."""
        self._abort_at = time.monotonic() + max(grace, 0.0)
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def check(self, n_prompt: int, max_tokens: int):
        if n_prompt == 0:
            raise EngineError("prompt is empty", param="prompt")
        if n_prompt > self.max_seq_len or max_tokens < 0:
            raise EngineError(f"This model's maximum context length is {self.max_seq_len} tokens, but the prompt has "
                              f"{n_prompt} tokens. Please shorten the prompt.", code="context_length_exceeded",
                              param="prompt")
        if n_prompt + max_tokens > self.max_seq_len:
            raise EngineError(f"This model's maximum context length is {self.max_seq_len} tokens. However, you "
                              f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for "
                              "the completion). Please reduce the prompt or max_tokens.",
                              code="context_length_exceeded", param="max_tokens")

    def submit(self, seqs: list[Sequence]):
        """Queue the n choices of one request (they share one prefill)."""
        if self._stop.is_set() or self._abort_at is not None:
            raise EngineError("server is shutting down", status=503, code="shutting_down")
        if self.waiting.qsize() >= self.max_queue:
            raise EngineError("too many queued requests, retry later", status=429, code="queue_full")
        self.check(len(seqs[0].prompt_ids), seqs[0].params.max_tokens)
        for s in seqs:
            if s.params.seed is not None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.params.seed & 0xFFFFFFFFFFFFFFFF)
        self.waiting.put(seqs)
        self._wake.set()

    # ---- engine thread ----------------------------------------------------------------------------
    def _run(self):
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    busy = self._step()
                except Exception as e:  # thread boundary: fail the running requests, keep serving the others
                    log.exception("engine step failed")
                    self._fail(self.active, e)
                    self.active, self.batch = [], None
                    busy = True
                if not busy:
                    self._wake.wait(0.05)
                    self._wake.clear()
        for s in self.active + self._drain_waiting():
            self._finish(s, "abort")

    def _fail(self, seqs: list[Sequence], e: Exception):
        message = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        for s in seqs:
            try:
                self._finish(s, "error", error=message)
            except Exception:  # a sink whose event loop is gone must not take the engine down with it
                log.exception("could not report the failure of a sequence")

    def _drain_waiting(self) -> list[Sequence]:
        out = []
        while not self.waiting.empty():
            out += self.waiting.get_nowait()
        return out

    def _step(self) -> bool:
        if self._abort_at is not None and time.monotonic() >= self._abort_at:
            for s in self.active:
                s.cancelled = True
            for s in self._drain_waiting():
                self._finish(s, "abort")
        for s in self.active:
            if s.cancelled:
                self._finish(s, "abort")
        self.active = [s for s in self.active if not s.finished]
        admitted = False
        while not self.waiting.empty() and len(self.active) < self.max_batch:
            seqs = self.waiting.get_nowait()
            for s in seqs:
                if s.cancelled:  # abandoned while it waited: its client still gets a final event
                    self._finish(s, "abort")
            seqs = [s for s in seqs if not s.finished]
            if seqs:
                if self.metrics:  # count them as running before their first token can reach a client
                    self.metrics.set_load(self.waiting.qsize(), len(self.active) + len(seqs))
                try:
                    self._prefill(seqs)
                except Exception as e:  # this request fails alone; the running batch goes on
                    log.exception("prefill failed")
                    self._fail(seqs, e)
                self.active += [s for s in seqs if not s.finished]
                admitted = True
        if self.metrics:
            self.metrics.set_load(self.waiting.qsize(), len(self.active))
        if not self.active:
            self.batch = None
            return admitted
        self._decode()
        return True

    def _prefill(self, seqs: list[Sequence]):
        p = seqs[0].params
        ids = torch.tensor([seqs[0].prompt_ids], device=self.device)
        want_prompt_lp = p.echo and p.logprobs is not None
        t0 = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                         logits_to_keep=0 if want_prompt_lp else 1)
        logits = out.logits[0].float()
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        prompt_lp = self._prompt_logprobs(logits, seqs[0].prompt_ids, p.logprobs) if want_prompt_lp else None
        if self.metrics:
            self.metrics.prefill(len(seqs[0].prompt_ids), time.perf_counter() - t0)
        for s in seqs:
            s.prefix = kv
            if prompt_lp is not None:
                s.sink({"prompt_logprobs": prompt_lp})
            if self.metrics:
                self.metrics.first_token(time.perf_counter() - s.submitted)
            if p.max_tokens == 0:
                self._finish(s, "length")
            else:
                self._emit(s, logits[-1])

    def _decode(self):
        seqs, keys, values, pad = self._batch_state()
        B, T = len(seqs), keys[0].shape[2]
        pad_t = torch.tensor(pad, device=self.device)
        cols = torch.arange(T + 1, device=self.device)
        mask = (cols[None, :] >= pad_t[:, None]).long()
        pos = (T - pad_t)[:, None]
        last = torch.tensor([[s.out_ids[-1]] for s in seqs], device=self.device)
        cache = DynamicCache(ddp_cache_data=list(zip(keys, values)), config=self.model.config)
        t0 = time.perf_counter()
        out = self.model(input_ids=last, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        self.batch = (seqs, [l.keys for l in cache.layers], [l.values for l in cache.layers], pad)
        logits = out.logits[:, -1].float()
        for i, s in enumerate(seqs):
            self._emit(s, logits[i])
        if self.metrics:
            self.metrics.decode_step(B, time.perf_counter() - t0)
        self.active = [s for s in self.active if not s.finished]

    def _batch_state(self):
        """The left-padded batch cache for `self.active`, rebuilt (copying KV) only when membership changed."""
        if self.batch is not None and self.batch[0] == self.active:
            return self.batch
        rows = []  # per sequence: unpadded per-layer (k, v) of shape [1, H, L, D]
        old = {id(s): i for i, s in enumerate(self.batch[0])} if self.batch else {}
        for s in self.active:
            if id(s) in old:
                i, p = old[id(s)], self.batch[3][old[id(s)]]
                rows.append([(k[i:i + 1, :, p:], v[i:i + 1, :, p:]) for k, v in zip(self.batch[1], self.batch[2])])
            else:
                rows.append(s.prefix)
                s.prefix = None
        T = max(r[0][0].shape[2] for r in rows)
        pad = [T - r[0][0].shape[2] for r in rows]
        keys, values = [], []
        for layer in range(len(rows[0])):
            keys.append(torch.cat([_left_pad(r[layer][0], T) for r in rows]))
            values.append(torch.cat([_left_pad(r[layer][1], T) for r in rows]))
        self.batch = (list(self.active), keys, values, pad)
        return self.batch

    # ---- per-token bookkeeping -------------------------------------------------------------------
    def _prompt_logprobs(self, logits, ids: list[int], k: int) -> list[dict | None]:
        lp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[1:], device=lp.device)
        chosen = lp[:-1].gather(1, target[:, None])[:, 0].tolist()
        top_v, top_i = lp[:-1].topk(max(k, 1), dim=-1) if len(ids) > 1 else (None, None)
        out = [None]
        for j in range(len(ids) - 1):
            top = list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist()))
            out.append({"id": ids[j + 1], "logprob": _clamp(chosen[j]), "top": [(a, _clamp(b)) for a, b in top]})
        return out

    def _emit(self, s: Sequence, logits: torch.Tensor):
        """Sample the next token of `s`, update its text, check stop conditions, send one event."""
        p = s.params
        tok = self._sample(logits, p, s.generator)
        s.out_ids.append(tok)
        event = {"token": tok}
        if p.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            top_v, top_i = lp.topk(max(p.logprobs, 1))
            top = list(zip(top_i[:p.logprobs].tolist(), top_v[:p.logprobs].tolist()))
            event["logprob"] = {"id": tok, "logprob": _clamp(lp[tok].item()), "top": [(a, _clamp(b)) for a, b in top]}
        finish = None
        if tok in self.eos_ids and not p.ignore_eos:
            finish = "stop"
        full = self.tok.decode(s.out_ids, skip_special_tokens=True)
        for stop in p.stop:
            at = full.find(stop, max(0, len(s.text) - len(stop)))
            if at >= 0:
                full, finish = full[:at], "stop"
        if finish is None and len(s.out_ids) >= p.max_tokens:
            finish = "length"
        s.text = full
        if self.metrics:
            self.metrics.tokens_out(1)
        if finish:
            self._finish(s, finish, event)
            return
        # Hold back an unfinished UTF-8 character and any tail that could still grow into a stop string.
        safe = len(full.rstrip("\ufffd"))
        for stop in p.stop:
            for n in range(min(len(stop) - 1, safe), 0, -1):
                if full[:safe].endswith(stop[:n]):
                    safe -= n
                    break
        event["text"] = full[s.sent:max(safe, s.sent)]
        s.sent = max(safe, s.sent)
        s.sink(event)

    def _finish(self, s: Sequence, reason: str, event: dict | None = None, error: str | None = None):
        if s.finished:
            return
        s.finished, s.prefix = True, None
        event = dict(event or {})
        event.update(text=s.text[s.sent:] if reason != "error" else "", finish_reason=reason)
        if error:
            event["error"] = error
        s.sent = len(s.text)
        s.sink(event)

    def _sample(self, logits: torch.Tensor, p: SamplingParams, gen) -> int:
        if p.temperature <= 1e-5:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < p.top_p  # keep the smallest prefix whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(probs, 1, generator=gen))


def _left_pad(x: torch.Tensor, T: int) -> torch.Tensor:
    if x.shape[2] == T:
        return x
    return torch.nn.functional.pad(x, (0, 0, T - x.shape[2], 0))


def _clamp(x: float) -> float:
    return max(x, NEG_INF_CLAMP)
