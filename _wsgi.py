"""Entry points: `gunicorn _wsgi:app` (production) and `python _wsgi.py --port 9090 --with key=value ...`.

The composition root: settings -> predictor (`sam_backend.sam.loading`) -> Label Studio layer (`model.SamModel`)
-> Flask app (`sam_backend.http.create_app`). Nothing imports this module: importing it builds the app.

The `--with` options are the seeds' (`sam_config=vit_b sam_checkpoint_file=... device=cpu out_poly=true`);
environment variables (settings.py) give the rest.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from flask import Flask

from model import SamModel
from sam_backend.errors import ModelError
from sam_backend.http import configure_logging, create_app
from sam_backend.sam import loading
from sam_backend.settings import Settings, from_environment, with_options

log = logging.getLogger("_wsgi")


def build_app(settings: Settings) -> Flask:
    """Load the model `settings` name (once per process) and serve it; raises ModelError on a bad model file."""
    configure_logging(settings)
    started = time.monotonic()
    predictor = loading.load(settings)
    log.info("model %s ready in %.1f s", predictor.model_version, time.monotonic() - started)
    return create_app(SamModel(predictor, settings), settings)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment Anything backend for Label Studio (development server; "
                                                 "use gunicorn _wsgi:app in production)")
    parser.add_argument("-p", "--port", type=int, default=9090)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--with", dest="options", nargs="+", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="seed options: sam_config, sam_checkpoint_file, device, out_mask, out_bbox, out_poly, "
                             "onnx, sam_choice")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ...")
    args = parser.parse_args(argv)
    try:
        settings = with_options(from_environment(), dict(args.options))
    except ValueError as error:
        parser.error(str(error))
    if args.log_level:
        from dataclasses import replace

        settings = replace(settings, log_level=args.log_level)
    try:
        app = build_app(settings)
    except ModelError as error:
        parser.exit(1, f"cannot start the backend: {error}\n")
    log.info("listening on http://%s:%d", args.host, args.port)
    app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)
    return 0


def _app_or_exit():
    """The app for gunicorn; a bad setting or model file ends the process with its message and no traceback."""
    try:
        return build_app(from_environment())
    except (ValueError, ModelError) as error:
        log.critical("cannot start the backend: %s", error)
        # Gunicorn's code for "App failed to load": it stops the whole server instead of respawning workers.
        raise SystemExit(4) from None


if __name__ == "__main__":
    sys.exit(main())
else:
    app = _app_or_exit()
