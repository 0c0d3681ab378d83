"""`python -m serve --model DIR`: serve an xbit checkpoint (or a float Hugging Face folder) over an OpenAI API."""

import argparse
import logging
import os
import sys

from .gate import DEFAULT_MAX_BODY_BYTES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint folder (xbit or plain Hugging Face)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("XBIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (env XBIT_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (bounds KV memory)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + completion tokens per sequence (default: the model's context)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body accepted; larger ones get 413 (default: 4 MiB)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish on shutdown; then they end with a 503 "
                        "(or an SSE error event) and the server exits")
    p.add_argument("--log-level", default="info")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_batch < 1 or (args.max_seq_len is not None and args.max_seq_len < 2):
        print("error: --max-batch must be >= 1 and --max-seq-len >= 2", file=sys.stderr)
        return 2
    if args.api_key is not None and not args.api_key.strip():
        print("error: the API key (--api-key or XBIT_API_KEY) is empty; give a key, or leave both unset to serve "
              "without one", file=sys.stderr)
        return 2
    if args.max_body_bytes < 1024 or args.shutdown_timeout < 0:
        print("error: --max-body-bytes must be >= 1024 and --shutdown-timeout >= 0", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model):
        print(f"error: --model {args.model} is not a folder", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    import uvicorn

    from .app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    server = None

    def on_load_error(reason: str):
        if server is not None:
            server.should_exit = True

    app = create_app(args.model, served_name=args.served_model_name, api_key=args.api_key, device=args.device,
                     on_load_error=on_load_error, max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                     max_seq_len=args.max_seq_len, max_queue=args.max_queue)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # abort what still runs a second before uvicorn would cut its connections, so clients get an answer
            app.state.serve.begin_shutdown(max(args.shutdown_timeout - 1.0, 0.0))
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = Server(config)
    server.run()
    if app.state.serve.load_error:
        print(f"error: could not load {args.model}: {app.state.serve.load_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
