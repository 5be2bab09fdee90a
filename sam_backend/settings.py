"""Every setting of the backend, read once from the environment (and `--with key=value` options).

Environment variable names follow the seed project (`RUN_ONNX_SAM`, `SAM_CHOICE`, `MOBILESAM_CHECKPOINT`,
`VITH_CHECKPOINT`) and Label Studio's ML backends (`LABEL_STUDIO_URL`, `LABEL_STUDIO_API_KEY`,
`LOCAL_FILES_DOCUMENT_ROOT`, `BASIC_AUTH_USER`/`BASIC_AUTH_PASS`). The `--with` keys of the OpenMMLab seed
(`sam_config`, `sam_checkpoint_file`, `device`, `out_mask`, `out_bbox`, `out_poly`, `onnx`) map onto them in
`WITH_OPTIONS`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

from sam_backend import catalog

ROOT = Path(__file__).resolve().parent.parent  # the repository (or the image's /app)
MODELS_DIR = catalog.MODELS_DIR
#: where the disk state store lives when WORKERS > 1 and STATE_STORE is unset (one per user, survives restarts)
DEFAULT_STORE_FOLDER = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam-backend" / "state"

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (use true or false)")


@dataclass(frozen=True)
class Settings:
    # Model
    sam_choice: str = "MobileSAM"  # SAM_CHOICE: MobileSAM | SAM | SAM2
    sam2_size: str = "tiny"  # SAM2_SIZE: tiny | small | base_plus | large, for SAM_CHOICE=SAM2 (SAM 2.1)
    sam_model_type: str = "vit_h"  # SAM_MODEL_TYPE (--with sam_config): vit_b | vit_l | vit_h, for SAM_CHOICE=SAM
    mobilesam_checkpoint: Path = catalog.CHECKPOINTS["vit_t"].default_path  # MOBILESAM_CHECKPOINT
    vith_checkpoint: Path = catalog.CHECKPOINTS["vit_h"].default_path  # VITH_CHECKPOINT
    sam_checkpoint: Path | None = None  # SAM_CHECKPOINT (--with sam_checkpoint_file): overrides both above
    device: str = "auto"  # DEVICE: auto | cpu | cuda | cuda:N
    run_onnx_sam: bool = False  # RUN_ONNX_SAM
    onnx_encoder: Path | None = None  # ONNX_ENCODER_PATH; default models/<model>.encoder.onnx
    onnx_decoder: Path | None = None  # ONNX_DECODER_PATH; default models/<model>.decoder.onnx
    torch_threads: int = 0  # TORCH_NUM_THREADS; 0 = torch's default
    ort_threads: int = 0  # ORT_NUM_THREADS; 0 = onnxruntime's default
    #: DECODE_THREADS: threads of one click's decode (SAM / MobileSAM on torch and ONNX Runtime); 0: every core
    #: for a click that runs alone, one core each for overlapping clicks; N: N threads for every click. 0 since
    #: the decoder's attention and head became matrix products (README, "Speed and memory"): on 2 cores of an
    #: AMD EPYC (AVX2) a lone ONNX click at 1920x1080 took 52 ms over HTTP against 60 ms with 1, and 8
    #: annotators at once p95 108 ms against 115 ms, for about 30-90 MiB more (a second decoder session)
    decode_threads: int = 0
    #: TORCH_BIND_THREADS: bind torch's OpenMP threads to cores, and a click after a rest to the first
    #: (`sam.cpu_binding`; read as torch loads). On 2 cores of an AMD EPYC, MobileSAM at 1920x1080 over HTTP: a
    #: click after a rest 68 -> 52 ms, but clicks without pauses and first clicks under load wait longer; hence
    #: off by default. Informational here: `sam.cpu_binding` reads the environment itself, before any Settings
    #: exist (a Settings built in code does not change it)
    torch_bind_threads: bool = False
    #: MAX_CONCURRENT_DECODES: clicks decoded at once per worker (each holds a mask of its image's size); 0 = the
    #: CPUs this process may use. The others wait their turn.
    max_concurrent_decodes: int = 0
    #: ENCODER_NICE: how much lower the CPU priority of embeddings is than that of clicks (Linux nice, 0..19)
    encoder_nice: int = 10
    # Label Studio
    label_studio_url: str = ""  # LABEL_STUDIO_URL
    label_studio_api_key: str = field(default="", repr=False)  # LABEL_STUDIO_API_KEY: legacy token or PAT
    local_files_root: Path | None = None  # LOCAL_FILES_DOCUMENT_ROOT
    # Images
    image_timeout: float = 10.0  # IMAGE_TIMEOUT seconds: connect and each read; a whole fetch at most 3x that
    image_url_ttl: float = 600.0  # IMAGE_URL_TTL: seconds a Label Studio upload URL is taken to hold its image (0: off)
    max_image_bytes: int = 64 << 20  # MAX_IMAGE_BYTES
    #: MAX_IMAGE_PIXELS: larger images are refused (413) from their header. 64 Mpx (8000 x 8000) takes every camera
    #: sensor up to 61 Mpx; at it one click costs about 75 MB (the full-size mask) and a decode at most 4 bytes per pixel
    max_image_pixels: int = 64_000_000
    allowed_hosts: tuple[str, ...] = ()  # ALLOWED_IMAGE_HOSTS: comma list; empty = Label Studio + public
    allow_private_hosts: bool = False  # ALLOW_PRIVATE_IMAGE_HOSTS
    # Caches and memory of earlier calls
    embedding_cache_size: int = 32  # EMBEDDING_CACHE_SIZE (images)
    max_concurrent_embeddings: int = 1  # MAX_CONCURRENT_EMBEDDINGS: encoder runs at once (each uses every core)
    embedding_float16: bool = True  # EMBEDDING_FLOAT16: cache embeddings as float16 (2 MB instead of 4 MB each)
    prompt_memory_size: int = 1024  # PROMPT_MEMORY_SIZE (task, class) entries
    prompt_memory_ttl: float = 3600.0  # PROMPT_MEMORY_TTL seconds
    #: REFINE_MASKS: feed the previous mask of the object back to SAM with each new click (and weigh it for a box
    #: drawn after clicks: refinement.box_after_clicks)
    refine_masks: bool = True
    #: ZOOM_IN: decode the clicks after the first on an object that is small in its image in a crop around it,
    #: embedded on its own (sam/zoom.py; one more embedding per small object, started after the first click)
    zoom_in: bool = True
    # Shared state (sam_backend/store): where embeddings, prompt memory and the image-URL map live
    state_store: str = ""  # STATE_STORE: memory | disk:<folder> | redis://host:port/db; "" = by WORKERS, see below
    state_store_max_bytes: int = 2 << 30  # STATE_STORE_MAX_BYTES: bound of the memory and disk stores
    #: STATE_STORE_SECRET: seals /setup's Label Studio token in a shared store; replicas that share a store share
    #: it. gunicorn.conf.py sets a random one per server start when unset (the workers of one server share it).
    state_store_secret: str = field(default="", repr=False)
    workers: int = 1  # WORKERS (gunicorn.conf.py's); more than 1 and no STATE_STORE means a shared disk store
    # Outputs
    out_mask: bool = True  # OUT_MASK (--with out_mask)
    out_bbox: bool = False  # OUT_BBOX (--with out_bbox)
    out_poly: bool = False  # OUT_POLY (--with out_poly)
    polygon_tolerance: float = 1.0  # POLYGON_TOLERANCE: polygon simplification in pixels (0 = exact pixel border)
    polygon_min_area: int = 16  # POLYGON_MIN_AREA: mask parts of fewer pixels get no polygon
    # Server
    basic_auth_user: str = ""  # BASIC_AUTH_USER
    basic_auth_pass: str = field(default="", repr=False)  # BASIC_AUTH_PASS
    max_content_length: int = 16 << 20  # MAX_CONTENT_LENGTH bytes of a request body
    max_points: int = 256  # MAX_POINTS per prompt
    max_tasks_per_call: int = 10_000  # MAX_TASKS_PER_CALL: tasks in one /predict without context (more: 413)
    #: ALLOWED_HOSTS: comma list of the names this server answers to in the Host header ("ml.example.com",
    #: ".example.com" for a domain and its subdomains, "*" for any). IP addresses, single-label names (Docker
    #: service names) and localhost / .local / .internal names are always answered.
    allowed_server_hosts: tuple[str, ...] = ()
    max_label_config_bytes: int = 8 << 20  # MAX_LABEL_CONFIG_BYTES: larger labeling configs get a 413, unparsed
    max_labels: int = 100_000  # MAX_LABELS: <Label>s (all tags together) a labeling config may have; more get a 413
    log_level: str = "INFO"  # LOG_LEVEL
    # Project jobs (sam_backend/jobs): what Label Studio's "Start training" (webhook START_TRAINING) runs over the
    # project: some of embed, boxes, auto; empty: nothing. auto needs JOB_AUTO_LABEL, the brush label of its masks.
    # embed only by default: boxes and auto write predictions, and /webhook is as open as the backend (Basic auth)
    job_on_training: tuple[str, ...] = ("embed",)  # JOB_ON_TRAINING
    job_auto_label: str = ""  # JOB_AUTO_LABEL

    @property
    def model_name(self) -> str:
        return catalog.model_name(self.model_type)

    @property
    def model_type(self) -> str:
        choice = self.sam_choice.lower()
        if choice == "sam2":
            return catalog.SAM2_PREFIX + self.sam2_size.lower()
        return "vit_t" if choice == "mobilesam" else self.sam_model_type

    @property
    def checkpoint(self) -> Path:
        if self.sam_checkpoint is not None:
            return self.sam_checkpoint
        if self.model_type == "vit_t":
            return self.mobilesam_checkpoint
        if self.model_type == "vit_h":
            return self.vith_checkpoint
        return catalog.CHECKPOINTS[self.model_type].default_path

    @property
    def state_store_spec(self) -> str:
        """STATE_STORE, or its default: `memory` for one worker, the shared `disk:<DEFAULT_STORE_FOLDER>` for more."""
        if self.state_store:
            return self.state_store
        return "memory" if self.workers <= 1 else f"disk:{DEFAULT_STORE_FOLDER}"

    @property
    def onnx_paths(self) -> tuple[Path, Path]:
        encoder, decoder = catalog.onnx_paths(self.model_type)
        return self.onnx_encoder or encoder, self.onnx_decoder or decoder


#: environment variable -> Settings field
ENVIRONMENT = {
    "SAM_CHOICE": "sam_choice",
    "SAM_MODEL_TYPE": "sam_model_type",
    "SAM2_SIZE": "sam2_size",
    "MOBILESAM_CHECKPOINT": "mobilesam_checkpoint",
    "VITH_CHECKPOINT": "vith_checkpoint",
    "SAM_CHECKPOINT": "sam_checkpoint",
    "DEVICE": "device",
    "RUN_ONNX_SAM": "run_onnx_sam",
    "ONNX_ENCODER_PATH": "onnx_encoder",
    "ONNX_DECODER_PATH": "onnx_decoder",
    "TORCH_NUM_THREADS": "torch_threads",
    "ORT_NUM_THREADS": "ort_threads",
    "DECODE_THREADS": "decode_threads",
    "TORCH_BIND_THREADS": "torch_bind_threads",
    "ENCODER_NICE": "encoder_nice",
    "MAX_CONCURRENT_DECODES": "max_concurrent_decodes",
    "LABEL_STUDIO_URL": "label_studio_url",
    "LABEL_STUDIO_API_KEY": "label_studio_api_key",
    "LOCAL_FILES_DOCUMENT_ROOT": "local_files_root",
    "IMAGE_TIMEOUT": "image_timeout",
    "IMAGE_URL_TTL": "image_url_ttl",
    "MAX_IMAGE_BYTES": "max_image_bytes",
    "MAX_IMAGE_PIXELS": "max_image_pixels",
    "ALLOWED_IMAGE_HOSTS": "allowed_hosts",
    "ALLOW_PRIVATE_IMAGE_HOSTS": "allow_private_hosts",
    "EMBEDDING_CACHE_SIZE": "embedding_cache_size",
    "EMBEDDING_FLOAT16": "embedding_float16",
    "MAX_CONCURRENT_EMBEDDINGS": "max_concurrent_embeddings",
    "PROMPT_MEMORY_SIZE": "prompt_memory_size",
    "PROMPT_MEMORY_TTL": "prompt_memory_ttl",
    "REFINE_MASKS": "refine_masks",
    "ZOOM_IN": "zoom_in",
    "STATE_STORE": "state_store",
    "STATE_STORE_MAX_BYTES": "state_store_max_bytes",
    "STATE_STORE_SECRET": "state_store_secret",
    "WORKERS": "workers",
    "OUT_MASK": "out_mask",
    "OUT_BBOX": "out_bbox",
    "OUT_POLY": "out_poly",
    "POLYGON_TOLERANCE": "polygon_tolerance",
    "POLYGON_MIN_AREA": "polygon_min_area",
    "BASIC_AUTH_USER": "basic_auth_user",
    "BASIC_AUTH_PASS": "basic_auth_pass",
    "MAX_CONTENT_LENGTH": "max_content_length",
    "MAX_POINTS": "max_points",
    "MAX_TASKS_PER_CALL": "max_tasks_per_call",
    "ALLOWED_HOSTS": "allowed_server_hosts",
    "MAX_LABEL_CONFIG_BYTES": "max_label_config_bytes",
    "MAX_LABELS": "max_labels",
    "LOG_LEVEL": "log_level",
    "JOB_ON_TRAINING": "job_on_training",
    "JOB_AUTO_LABEL": "job_auto_label",
}

#: `--with` keys of the seeds -> environment variable
WITH_OPTIONS = {
    "sam_config": "SAM_MODEL_TYPE",
    "sam_checkpoint_file": "SAM_CHECKPOINT",
    "device": "DEVICE",
    "out_mask": "OUT_MASK",
    "out_bbox": "OUT_BBOX",
    "out_poly": "OUT_POLY",
    "onnx": "RUN_ONNX_SAM",
    "sam_choice": "SAM_CHOICE",
}


def _convert(name: str, kind: str, raw: str):
    if kind.startswith("bool"):
        return parse_bool(name, raw)
    if kind.startswith("int"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if kind.startswith("float"):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
    if kind.startswith("tuple"):
        return tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    if "Path" in kind:
        return Path(raw).expanduser() if raw else None
    return raw


def from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default: os.environ); unknown variables are ignored, bad values raise."""
    environ = os.environ if environ is None else environ
    kinds = {f.name: str(f.type) for f in fields(Settings)}
    values = {}
    for variable, name in ENVIRONMENT.items():
        if variable in environ:
            value = _convert(variable, kinds[name], environ[variable])
            if value is not None:
                values[name] = value
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if settings.sam_choice.lower() not in {"mobilesam", "sam", "sam2"}:
        raise ValueError(f"SAM_CHOICE={settings.sam_choice!r}: use MobileSAM, SAM or SAM2")
    if settings.sam_choice.lower() == "sam2":
        if settings.sam2_size.lower() not in catalog.SAM2_CONFIGS:
            raise ValueError(f"SAM2_SIZE={settings.sam2_size!r}: use {', '.join(catalog.SAM2_CONFIGS)}")
    elif settings.model_type not in {"vit_t", "vit_b", "vit_l", "vit_h"}:
        raise ValueError(f"SAM_MODEL_TYPE={settings.sam_model_type!r}: use vit_b, vit_l or vit_h")
    if settings.embedding_cache_size < 1:
        raise ValueError("EMBEDDING_CACHE_SIZE must be at least 1")
    if settings.max_tasks_per_call < 1:
        raise ValueError("MAX_TASKS_PER_CALL must be at least 1")
    if settings.max_concurrent_embeddings < 1:
        raise ValueError("MAX_CONCURRENT_EMBEDDINGS must be at least 1")
    if settings.decode_threads < 0:
        raise ValueError(f"DECODE_THREADS={settings.decode_threads}: use 1 or more threads, or 0 (every core alone, one each when clicks overlap)")
    if settings.max_concurrent_decodes < 0:
        raise ValueError(f"MAX_CONCURRENT_DECODES={settings.max_concurrent_decodes}: use 1 or more, or 0 (one per CPU)")
    if not 0 <= settings.encoder_nice <= 19:
        raise ValueError(f"ENCODER_NICE={settings.encoder_nice}: use 0 (same priority as clicks) to 19 (lowest)")
    spec = settings.state_store_spec
    if not (spec == "memory" or (spec.startswith("disk:") and len(spec) > 5)
            or spec.startswith(("redis://", "rediss://", "unix://"))):
        raise ValueError(f"STATE_STORE={spec!r}: use memory, disk:<folder> or redis://host:port/db")
    if settings.state_store_max_bytes < 1 << 20:
        raise ValueError("STATE_STORE_MAX_BYTES must be at least 1048576 (one embedding is 2 MiB)")
    if settings.max_label_config_bytes < 1:
        raise ValueError("MAX_LABEL_CONFIG_BYTES must be at least 1")
    if settings.max_labels < 1:
        raise ValueError("MAX_LABELS must be at least 1")
    if not settings.polygon_tolerance >= 0:  # also refuses NaN
        raise ValueError(f"POLYGON_TOLERANCE={settings.polygon_tolerance}: use 0 or more pixels")
    unknown_steps = sorted(set(settings.job_on_training) - {"embed", "boxes", "auto"})
    if unknown_steps:
        raise ValueError(f"JOB_ON_TRAINING: unknown step(s) {unknown_steps}; use some of embed, boxes, auto (or "
                         f"nothing)")
    if "auto" in settings.job_on_training and not settings.job_auto_label:
        raise ValueError("JOB_ON_TRAINING has auto: set JOB_AUTO_LABEL to the brush label its masks get")
    if bool(settings.basic_auth_user) != bool(settings.basic_auth_pass):
        raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")


def with_options(settings: Settings, options: Mapping[str, str]) -> Settings:
    """Apply the seeds' `--with key=value` options on top of `settings`."""
    unknown = sorted(set(options) - set(WITH_OPTIONS))
    if unknown:
        raise ValueError(f"unknown --with option(s) {unknown}; known: {sorted(WITH_OPTIONS)}")
    environ = {WITH_OPTIONS[key]: value for key, value in options.items()}
    if "sam_config" in options:
        # The OpenMMLab seed names a SAM model by its config; vit_t means MobileSAM.
        environ["SAM_CHOICE"] = "MobileSAM" if options["sam_config"] == "vit_t" else "SAM"
        if options["sam_config"] == "vit_t":
            environ.pop("SAM_MODEL_TYPE")
    overrides = from_environment(environ)
    changed = {name: getattr(overrides, name) for name in (ENVIRONMENT[v] for v in environ)}
    result = replace(settings, **changed)
    validate(result)
    return result
