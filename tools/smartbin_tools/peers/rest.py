"""A REST classifier, as a user would write one instead of ``smartbin-serve``: FastAPI under
uvicorn, the photo POSTed as the request body (``Content-Type: image/jpeg``) to ``/classify``,
the ranked labels back as JSON. The work runs in FastAPI's thread pool (``run_in_threadpool``)
so that the event loop keeps accepting calls, as FastAPI's documentation advises for blocking
code.

Run it as ``python -m smartbin_tools.peers.rest --bundle DIR [--engine onnxruntime --onnx
FILE]``: it loads the model, binds a free loopback port, says ``serving on port N`` on stderr
and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from smartbin.bundle import load_bundle
from smartbin.preprocessing import ImageDecodeError
from smartbin_tools.peers.engines import ENGINES, Engine, make_engine


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="smartbin REST peer", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/classify")
    async def classify(request: Request) -> dict[str, Any]:
        photo = await request.body()
        try:
            ranked = await run_in_threadpool(engine.classify, photo)
        except ImageDecodeError as err:
            raise HTTPException(status_code=400, detail=str(err)) from err
        return {
            "predictions": [{"label": p.label, "score": p.score} for p in ranked],
            "model_version": engine.bundle.version,
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--engine", choices=ENGINES, default="tflite")
    parser.add_argument("--onnx", type=Path, help="the float32 model as ONNX (onnxruntime)")
    parser.add_argument("--threads", type=int, help="the model's threads (default: all cores)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engine = make_engine(args.engine, load_bundle(args.bundle), args.onnx, args.threads)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(128)  # calls wait in the backlog until uvicorn takes them
    print(f"serving on port {sock.getsockname()[1]}", file=sys.stderr, flush=True)
    config = uvicorn.Config(build_app(engine), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
