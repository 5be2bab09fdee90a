"""The error types of the whole backend, in one place.

Two families, told apart by who is at fault:

* `ClientError`: what the caller sent cannot be served. It carries the HTTP status to answer with and a message
  that names the field or the setting; `sam_backend.http` turns every one into `{"error": message}` with that
  status, so no module above it needs to know Flask.
* `ModelError`: a model file is missing or unusable (a fault of the deployment, found at start-up); the message
  names the file and the command that makes a good one.

Subclasses live here too, so that a module can raise the error of another layer's vocabulary without importing
that layer.
"""
from __future__ import annotations


class ClientError(Exception):
    """A request the backend refuses: answered with `status` and `message` (never a traceback)."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class RequestError(ClientError, ValueError):
    """The request body is malformed (400)."""


class ContextError(ClientError, ValueError):
    """The interactive context (keypoints, rectangles, drafts) of a /predict call is malformed (400)."""


class ConfigError(ClientError, ValueError):
    """The labeling config, or a label in a request, does not fit this backend (422)."""

    status = 422


class ImageError(ClientError):
    """A task's image cannot be had or decoded; `status` says why (400, 403, 404, 413, 415, 422, 502, 504)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status)


class ModelError(RuntimeError):
    """A model file is missing or unusable; the message names the file and how to get a good one."""


class CheckpointError(ModelError):
    """The checkpoint is missing or is not a checkpoint of the requested model."""


class OnnxModelError(ModelError):
    """An ONNX model file is missing, unreadable, or not the model this predictor expects."""


class ChecksumError(RuntimeError):
    """A downloaded or present model file is not the published one (size or sha256 differ)."""
