"""``qwenlab serve``: the OpenAI-compatible HTTP server (see docs/server.md).

    qwenlab serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name NAME]
                  [--max-model-len N] [--kv-cache-memory SIZE] [--max-num-seqs N] [--max-queue N]

The server answers at once (``/health`` is 503 while the model loads) and binds to 127.0.0.1 unless told
otherwise. The API key may also come from the environment variable QWENLAB_API_KEY.
"""

from __future__ import annotations

import argparse
import os

from ..cli import register
from ..errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (or a Hugging Face name when online); "
                   "default: the embedded default model, served as 'qwenlab-default'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $QWENLAB_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length per sequence (prompt + output)")
    p.add_argument("--kv-cache-memory", default=None, help="KV-cache budget, e.g. 2GiB (default: automatic)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences in the running batch")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait beyond --max-num-seqs; past it requests get 429 (default 64)")
    p.add_argument("--max-body-size", default="8MiB", help="largest request body accepted (default 8MiB)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the engine's)")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization applied on load (docs/quantization.md)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    # Test only: lets a request force its output or fail the engine step (see qwenlab/serve/logits.py).
    p.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import uvicorn

    from ..checkpoint import parse_size, resolve_model_dir
    from ..serve import ServerConfig, create_app

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.model is None:
        from ..assets import DEFAULT_MODEL_NAME, default_model_dir

        args.model = str(default_model_dir())
        args.served_model_name = args.served_model_name or DEFAULT_MODEL_NAME
    resolve_model_dir(args.model)  # a wrong path is one clear line before anything binds
    config = ServerConfig(model=args.model, served_model_name=args.served_model_name,
                          api_key=args.api_key or os.environ.get("QWENLAB_API_KEY") or None,
                          max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                          max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
                          max_body_bytes=parse_size(args.max_body_size), dtype=args.dtype,
                          test_hooks=args.test_hooks,
                          engine_kwargs={"quantization": args.quantization} if args.quantization else {})
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=args.log_level == "debug", timeout_graceful_shutdown=5))
    failure: list[str] = []

    def on_load_failure(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app.state.server.on_load_failure = on_load_failure
    asyncio.run(server.serve())
    if failure:
        raise ConfigError(f"cannot serve {args.model}: {failure[0]}")
    return 0


register("serve", "OpenAI-compatible HTTP server (chat, completions, streaming, tools, metrics)", add_arguments, run)
