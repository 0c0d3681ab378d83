"""FastAPI app: OpenAI-compatible completions/chat, tokenizer endpoints, health, Prometheus metrics."""

import asyncio
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineError, SamplingParams, Sequence
from .gate import DEFAULT_MAX_BODY_BYTES, Gate, error_body
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("serve.app")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    return Response(error_body(status, message, param, code), status_code=status, media_type="application/json")


def load_model(model_dir: str, device: str | None = None):
    """An xbit checkpoint or a plain float Hugging Face folder, plus its tokenizer."""
    import torch
    import xbit
    from transformers import AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return xbit.load(model_dir, device=device), AutoTokenizer.from_pretrained(model_dir)


class ServerState:
    def __init__(self, name: str, api_key: str | None, engine_kwargs: dict, aliases: set):
        self.name, self.api_key, self.engine_kwargs = name, api_key, engine_kwargs
        self.aliases = {name} | aliases  # names a request may use for the one served model
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.tok = None
        self.load_error: str | None = None
        self._tok_str: dict[int, str] = {}

    def attach(self, model, tokenizer):
        self.tok = tokenizer
        self.engine = Engine(model, tokenizer, metrics=self.metrics, **self.engine_kwargs)
        self.engine.start()

    def begin_shutdown(self, grace: float):
        """The server stops accepting connections: refuse new requests, abort the running ones after `grace` s."""
        if self.engine:
            self.engine.drain(grace)

    def token_str(self, i: int) -> str:
        s = self._tok_str.get(i)
        if s is None:
            s = self._tok_str[i] = self.tok.decode([i])
        return s


def create_app(model_dir: str | None = None, *, model=None, tokenizer=None, served_name: str | None = None,
               api_key: str | None = None, device: str | None = None, on_load_error=None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, **engine_kwargs) -> FastAPI:
    """Build the app. With `model_dir` the model loads in a background thread (/health says 503 until ready)."""
    name = served_name or (Path(model_dir).name if model_dir else "model")
    st = ServerState(name, api_key, engine_kwargs, {str(model_dir)} if model_dir else set())

    def _load():
        try:
            st.attach(*load_model(model_dir, device))
            log.info("model %s ready (max_seq_len=%d)", model_dir, st.engine.max_seq_len)
        except Exception as e:  # thread boundary: any failure must reach /health and on_load_error, not vanish
            st.load_error = " ".join(f"{type(e).__name__}: {e}".split())  # one line for /health and the exit message
            log.error("loading %s failed: %s", model_dir, st.load_error)
            log.debug("loading %s failed", model_dir, exc_info=True)
            if on_load_error:
                on_load_error(st.load_error)

    @asynccontextmanager
    async def lifespan(app):
        if model is not None:
            st.attach(model, tokenizer)
        else:
            threading.Thread(target=_load, name="serve-load", daemon=True).start()
        yield
        if st.engine:
            st.engine.stop()

    app = FastAPI(title="xbit OpenAI-compatible server", lifespan=lifespan)
    app.state.serve = st
    app.add_middleware(Gate, st=st, max_body_bytes=max_body_bytes)
    _install_handlers(app, st)
    _install_routes(app, st)
    return app


def _install_handlers(app: FastAPI, st: ServerState):
    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and _is_field(x)]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, loc = "The request body is not valid JSON.", []
        return error_response(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", param=loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(EngineError)
    async def on_engine(request, exc: EngineError):
        return error_response(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(Exception)
    async def on_any(request, exc: Exception):  # last resort: still the OpenAI envelope, and the server lives on
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")


def _is_field(loc_part) -> bool:
    """A field name or list index, not one of pydantic's union-member tags ('str', 'function-after[...]')."""
    return isinstance(loc_part, int) or (loc_part.isidentifier() and loc_part not in ("str", "int", "list"))


def _ready(st: ServerState, model: str | None = None) -> Engine:
    if st.engine is None:
        raise EngineError(st.load_error or "model is loading", status=503, code="model_loading")
    if model is not None and model not in st.aliases:
        raise EngineError(f"The model `{model}` does not exist.", status=404, code="model_not_found", param="model")
    return st.engine


def _install_routes(app: FastAPI, st: ServerState):
    from . import openai_format as fmt

    @app.get("/health")
    async def health():
        if st.engine is None:
            return JSONResponse({"status": "failed" if st.load_error else "loading", "error": st.load_error},
                                status_code=503)
        if not st.engine.alive:
            return JSONResponse({"status": "stopped", "error": "the generation engine is not running"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        eng = _ready(st)
        return {"object": "list", "data": [{"id": st.name, "object": "model", "created": 0, "owned_by": "xbit",
                                            "max_model_len": eng.max_seq_len}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eng = _ready(st)
        t = st.tok
        return {"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token,
                "pad_token": t.pad_token, "unk_token": t.unk_token, "chat_template": t.chat_template,
                "model_max_length": eng.max_seq_len, "vocab_size": eng.vocab_size}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        eng = _ready(st, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise EngineError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = await asyncio.to_thread(fmt.chat_prompt_ids, st.tok, req.messages, req.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(st.tok.encode, req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": eng.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        eng = _ready(st, req.model)
        fmt.check_ids(req.tokens, eng.vocab_size, "tokens")
        return {"prompt": await asyncio.to_thread(st.tok.decode, req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        eng = _ready(st, req.model)
        # tokenizing a prompt of megabytes takes seconds: off the event loop, so other clients are not frozen
        prompts = await asyncio.to_thread(fmt.completion_prompts, req.prompt, st.tok, eng.vocab_size)
        fmt.check_choices(len(prompts), req.n)
        groups = []
        for ids, _ in prompts:
            max_tokens = req.max_tokens if req.max_tokens is not None else eng.max_seq_len - len(ids)
            eng.check(len(ids), max_tokens)
            params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    stop=req.stop_list(), logprobs=req.logprobs, echo=req.echo,
                                    ignore_eos=req.ignore_eos)
            groups.append((ids, params))
        run = _Run(eng, groups, req.n, req.seed)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": st.name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(run, fmt.completion_stream(run, st, prompts, req, meta, include_usage))
        await run.collect(request)
        return fmt.completion_response(run, st, prompts, req, meta)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        eng = _ready(st, req.model)
        ids = await asyncio.to_thread(fmt.chat_prompt_ids, st.tok, req.messages, True)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = max_tokens if max_tokens is not None else eng.max_seq_len - len(ids)
        eng.check(len(ids), max_tokens)
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                stop=req.stop_list(), logprobs=k, ignore_eos=req.ignore_eos)
        run = _Run(eng, [(ids, params)], req.n, req.seed)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": st.name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(run, fmt.chat_stream(run, st, meta, include_usage))
        await run.collect(request)
        return fmt.chat_response(run, st, meta)


class _Run:
    """The sequences of one HTTP request and the single queue their events arrive on: (choice index, event)."""

    def __init__(self, eng: Engine, groups: list, n: int, seed: int | None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.eng, self.n = eng, n
        self.seqs: list[Sequence] = []
        self.events: list[list[dict]] = []
        self.n_prompt = sum(len(ids) for ids, _ in groups)
        submitted = []
        try:
            for ids, params in groups:
                group = []
                for j in range(n):
                    p = SamplingParams(**{**params.__dict__, "seed": None if seed is None else seed + j})
                    group.append(self._new_seq(ids, p))
                eng.submit(group)
                submitted += group
        except EngineError:
            self.cancel()
            raise

    def _new_seq(self, ids, params) -> Sequence:
        index = len(self.seqs)
        self.events.append([])
        seq = Sequence(prompt_ids=ids, params=params,
                       sink=lambda ev: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, ev)))
        self.seqs.append(seq)
        return seq

    def cancel(self):
        for s in self.seqs:
            s.cancelled = True

    async def next_event(self):
        return await self.queue.get()

    async def collect(self, request: Request):
        """Every event of every sequence. A client that disconnects meanwhile cancels them: the engine frees their
        slots at its next step instead of generating up to max_tokens for nobody."""
        gone = asyncio.Event()
        watch = asyncio.create_task(_watch_disconnect(request, self, gone))
        done = 0
        try:
            while done < len(self.seqs):
                i, ev = await self.next_event()
                self.events[i].append(ev)
                done += "finish_reason" in ev
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            watch.cancel()
        if gone.is_set():  # nobody reads the answer; 499 (client closed request) keeps it out of the 5xx count
            raise EngineError("the client closed the request", status=499, code="client_closed")
        for evs in self.events:
            reason = evs[-1]["finish_reason"]
            if reason == "abort":
                raise EngineError("the server is shutting down; request cancelled", status=503, code="aborted")
            if reason == "error":
                raise EngineError(f"generation failed: {evs[-1].get('error')}", status=500, code="engine_error")


async def _watch_disconnect(request: Request, run: _Run, gone: asyncio.Event):
    """The body is read already, so the next ASGI message is the client's `http.disconnect`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()
    run.cancel()


def _sse(run: _Run, chunks) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # the headers are sent: the failure goes out as a final error event, not a cut
            log.exception("stream failed")
            yield f"data: {error_body(500, f'internal error: {type(e).__name__}').decode()}\n\n"
        finally:  # client went away or stream finished: free the batch slots either way
            run.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
