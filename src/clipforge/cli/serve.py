"""``clipforge serve``: the search service (HTTP API + web page) over an index and a model.

OpenAPI schema at /openapi.json, listed by a local page at /docs. Binds to 127.0.0.1 unless
--host says otherwise; --api-key (or CLIPFORGE_API_KEY) protects every endpoint except /health and
the pages themselves. Requests must name this server in their Host header (localhost names, the
address they came to, or a --trusted-host name), which stops DNS rebinding.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clipforge.cli.convert import HELP_RUNTIME, HELP_TEXT_MODEL_DIR, RUNTIMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve text/image search, zero-shot classification and a web page",
                       description=__doc__)  # fmt: skip
    p.add_argument("--index", required=True, help="index directory from clipforge index")
    p.add_argument("--model", required=True,
                   help="the model the embeddings were made with: a checkpoint path or a pretrained name")
    p.add_argument("--arch", default=None, help="architecture name for state dicts that do not reveal it")
    p.add_argument("--text-model-dir", default=None, metavar="DIR", help=HELP_TEXT_MODEL_DIR)
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=HELP_RUNTIME + " (shown in /health)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default cpu)")
    p.add_argument("--api-key", default=None, help="require this key (X-API-Key header); default $CLIPFORGE_API_KEY")
    p.add_argument("--max-k", type=int, default=200, help="largest k a request may ask for")
    p.add_argument("--max-labels", type=int, default=100, help="most labels per /classify request")
    p.add_argument("--max-request-mb", type=float, default=16, help="largest request body in MiB")
    p.add_argument("--max-image-pixels", type=int, default=2**24, help="larger uploads are refused unread")
    p.add_argument("--trusted-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header is NAME (repeatable; '*': any name). Localhost "
                        "names and the address a request came to are always served")  # fmt: skip
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="serve even when the model's weights are not those the index was built with (logged)")
    p.add_argument("--index-name", default=None,
                   help="the index's name in clip-retrieval's API (/indices-list; default: the index directory's name)")
    p.add_argument("--allow-image-url", action="store_true",
                   help="let clip-retrieval's /knn-service fetch an image_url: the server then requests any "
                        "address a client names (default: refused)")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (e.g. http://localhost:1235, where clip-front runs) whose pages may call "
                        "clip-retrieval's routes from a browser (repeatable)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the model, torch's or ONNX Runtime's (default: torch's default)")
    p.set_defaults(func=run)


def _cap_malloc_arenas(arenas: int = 2) -> None:
    """Requests run on Starlette's pool of 40 threads; glibc gives each its own malloc arena, and
    under sustained load the arenas fragment: RSS crept up ~200 MB over two minutes before levelling
    off (benchmarks/faults/load_test.py). Two arenas keep it flat, at no measured cost in throughput.
    Must run before the threads exist; a no-op where the C library is not glibc (or
    MALLOC_ARENA_MAX is set)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    _cap_malloc_arenas()
    import uvicorn

    app, settings = build_app(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it can query it")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _trusted_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    """--trusted-host names, and --host when it names one address (a wildcard names none)."""
    names = list(getattr(args, "trusted_host", None) or ())
    if args.host not in ("0.0.0.0", "::", ""):
        names.append(args.host)
    return tuple(names)


def build_app(args: argparse.Namespace):
    """The FastAPI app and its settings, from the command's flags (loads the model)."""
    import torch

    import clipforge
    from clipforge.cli import CliError
    from clipforge.model.onnx_runtime import is_onnx_export
    from clipforge.search.service import ServeSettings, create_app
    from clipforge.utils import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ServeSettings(
        max_request_bytes=int(args.max_request_mb * 2**20), max_image_pixels=args.max_image_pixels,
        max_k=args.max_k, max_labels=args.max_labels, api_key=args.api_key or os.environ.get("CLIPFORGE_API_KEY"),
        trusted_hosts=_trusted_hosts(args), allow_model_mismatch=args.allow_model_mismatch,
        index_name=getattr(args, "index_name", None), allow_image_url=getattr(args, "allow_image_url", False),
        cors_origins=tuple(getattr(args, "cors_origin", None) or ()),
    )  # fmt: skip
    runtime = getattr(args, "runtime", "auto")
    onnx = runtime == "onnx" or (runtime == "auto" and is_onnx_export(Path(args.model)))
    if onnx and args.device not in ("cpu", "auto"):
        raise CliError(f"the onnx runtime runs on the CPU; drop --device {args.device}")
    model, preprocess = clipforge.load(args.model, device="cpu" if onnx else resolve_device(args.device),
                                       arch=args.arch, text_model_dir=args.text_model_dir, runtime=runtime)
    return create_app(args.index, model, preprocess, settings), settings
