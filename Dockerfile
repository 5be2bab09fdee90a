# syntax=docker/dockerfile:1
#
# Segment Anything (MobileSAM by default) ML backend for Label Studio.
#
# Targets (docker build --target NAME .):
#   cpu     the default (last stage): ONNX Runtime only, no torch, about 0.8 GB. Serves the MobileSAM ONNX
#           models exported in the `export` stage (RUN_ONNX_SAM=true). Needs ONNX=true (the default).
#   torch   requirements.txt: torch + segment-anything + MobileSAM, RUN_ONNX_SAM=false, DEVICE=auto. This is
#           also the CUDA image: PyPI's Linux torch wheel ships the CUDA runtime, so the same image uses an
#           NVIDIA GPU when the container gets one (compose: the GPU block in docker-compose.yml) and the CPU
#           otherwise. Several GB. Needed for SAM_CHOICE=SAM (ViT-B/L/H) and the torch predictor.
#   export  build stage: torch, the verified MobileSAM checkpoint and (ONNX=true) its ONNX export, which
#           onnx_converter.py checks against torch on real photos (the build fails if they disagree).
#
# Why the CPU target has no torch: the torch wheel on PyPI is the CUDA build (over 4 GB with its nvidia-*
# wheels); the small CPU-only wheel lives on PyTorch's own index, which this project does not use (package
# registries only). So torch exists only where it is needed: in `export`, to write the ONNX files, and in
# the `torch` target. The `cpu` image copies the models and installs requirements-onnx.txt (torch-free).
# Building `cpu` still downloads torch once for the export stage; BuildKit caches that layer.
#
# Build arguments:
#   ONNX=true|false  export MobileSAM to ONNX at build time (default true; `cpu` requires it). In the
#                    `torch` image the ONNX files are an option: RUN_ONNX_SAM=true switches to them.
#
# No secrets here: LABEL_STUDIO_API_KEY and BASIC_AUTH_* come from the environment at run time only.

FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /app
# The runtime user. Code and models stay root-owned and read-only to it; it writes only to its home
# (library caches) and /tmp.
RUN groupadd --system --gid 10001 sam \
    && useradd --system --uid 10001 --gid sam --create-home --home-dir /home/sam --shell /usr/sbin/nologin sam


FROM base AS torch-deps
# Requirement files alone first, so code changes do not reinstall torch.
COPY requirements-base.txt requirements.txt requirements-sam2.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r requirements.txt \
    && SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps -r requirements-sam2.txt


FROM torch-deps AS export
ARG ONNX=true
# The same command the README and CI use: downloads MobileSAM and checks its published sha256.
COPY sam_backend/ ./sam_backend/
COPY tools/__init__.py tools/weights.py ./tools/
RUN python -m tools.weights mobile_sam
# The exporter's own needs (onnxscript for torch's dynamo exporter, scikit-image for the photos it checks the
# ONNX masks on against torch) are in requirements.txt, as `make run` exports too.
COPY *.py ./
RUN case "${ONNX}" in \
      true|1|yes) python onnx_converter.py --model-type vit_t --checkpoint models/mobile_sam.pt --out-dir models ;; \
      false|0|no) echo "ONNX=${ONNX}: no ONNX export" ;; \
      *) echo "ONNX=${ONNX}: use true or false" >&2; exit 1 ;; \
    esac \
    && mkdir -p models-onnx \
    && find models -maxdepth 1 -name '*.onnx' -exec cp {} models-onnx/ \; \
    && chmod -R a+rX models models-onnx


FROM torch-deps AS torch
ENV PORT=9090 \
    RUN_ONNX_SAM=false \
    DEVICE=auto
COPY . .
COPY --from=export /app/models ./models
USER 10001:10001
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/app/gunicorn.conf.py"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"]


FROM base AS cpu
COPY requirements-base.txt requirements-onnx.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r requirements-onnx.txt
ENV PORT=9090 \
    RUN_ONNX_SAM=true
COPY . .
# The ONNX files only: the torch checkpoint would be 40 MB of dead weight here.
COPY --from=export /app/models-onnx ./models
# Fail the build, not the first request, when the ONNX files are missing (ONNX=false) or named other than
# where sam_backend/settings.py looks for them.
RUN python -c "import sys; from sam_backend import settings; missing = [str(p) for p in settings.from_environment().onnx_paths if not p.is_file()]; sys.exit('cpu target: missing ' + ', '.join(missing) + ' (build with ONNX=true)' if missing else 0)"
USER 10001:10001
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/gunicorn.conf.py"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"]
