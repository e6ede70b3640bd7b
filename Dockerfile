# Images for a fleet from one multi-stage build: the cloud aggregator, the device agent, and an
# inference-only image (numpy + the TFLite runtime, no PyTorch) for devices that only run a model.
#
#   docker build --target aggregator -t fedmask-aggregator --build-arg TORCH_INDEX_URL=<CPU wheel index> .
#   docker build --target agent      -t fedmask-agent      --build-arg TORCH_INDEX_URL=<CPU wheel index> .
#   docker build --target inference  -t fedmask-inference .
#
# TORCH_INDEX_URL: the package index that serves the CPU build of torch==2.13.0. Without it pip uses
# its default index, whose x86_64 wheel pulls the CUDA libraries; on 64-bit ARM that wheel is the CPU
# one already. Every image runs as the unprivileged user `fedmask` in /var/lib/fedmask (a volume: the
# agent's state and models, a SQLite store if one is used). Arguments after the image name go to the
# entrypoint. See docs/deployment.md, "Containers". tests/test_dockerfile.py checks this file's stages,
# that every COPY source exists, and that .dockerignore keeps the build context small.

ARG PYTHON_VERSION=3.11

# --- common base: slim Python, no bytecode or pip cache, the runtime user -------------------------
FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --create-home --uid 10001 --user-group fedmask \
    && install -d -o fedmask -g fedmask /var/lib/fedmask

# --- the fedmask wheel (sources only; nothing of the build stays in the final images) -------------
FROM base AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedmask/ fedmask/
COPY models/ models/
COPY datasets/ datasets/
COPY protocol/ protocol/
COPY strategies/ strategies/
COPY simulator/ simulator/
COPY aggregator/ aggregator/
COPY device_agent/ device_agent/
COPY storage/ storage/
COPY broker_config/ broker_config/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- PyTorch (CPU), pinned: both sides derive the frozen weights with it and must agree bit for bit -
# The aggregator needs it too: it derives the task's weight digest and sizes the masks by building the
# model (aggregator/tasks.py, strategies/*.py server halves).
FROM base AS torch
ARG TORCH_INDEX_URL=""
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0

# --- cloud aggregator: the SQL store (SQLite or PostgreSQL) -----------------------------------------
FROM torch AS aggregator
COPY --from=build /wheels/ /tmp/wheels/
RUN pip install "$(ls /tmp/wheels/fedmask-*.whl)[store]" && rm -rf /tmp/wheels
USER fedmask
WORKDIR /var/lib/fedmask
VOLUME ["/var/lib/fedmask"]
# Alive, and its working volume takes new files (a full or read-only volume stops every commit).
HEALTHCHECK --interval=60s --timeout=10s --start-period=60s \
    CMD python -c "import tempfile; tempfile.TemporaryFile(dir='/var/lib/fedmask').close()"
ENTRYPOINT ["fedmask", "aggregator", "run"]

# --- device agent: training, TFLite export and the TFLite runtime; stays up between tasks ----------
FROM torch AS agent
COPY --from=build /wheels/ /tmp/wheels/
RUN pip install "$(ls /tmp/wheels/fedmask-*.whl)[runtime,train]" && rm -rf /tmp/wheels
USER fedmask
WORKDIR /var/lib/fedmask
VOLUME ["/var/lib/fedmask"]
# Alive, and its state directory takes new files (the agent saves its state after every step).
HEALTHCHECK --interval=60s --timeout=10s --start-period=60s \
    CMD python -c "import tempfile; tempfile.TemporaryFile(dir='/var/lib/fedmask').close()"
# SIGTERM (docker stop) ends it cleanly: presence offline, state saved.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedmask", "agent", "run", "--serve"]

# --- inference only: numpy and the TFLite runtime, no PyTorch ------------------------------------
FROM base AS inference
COPY --from=build /wheels/ /tmp/wheels/
RUN pip install "$(ls /tmp/wheels/fedmask-*.whl)[runtime]" && rm -rf /tmp/wheels
USER fedmask
WORKDIR /var/lib/fedmask
VOLUME ["/var/lib/fedmask"]
# The interpreter loads (the image's one job).
HEALTHCHECK --interval=300s --timeout=20s \
    CMD python -c "from fedmask.device_agent.inference import _runtime_module; _runtime_module()"
ENTRYPOINT ["fedmask", "predict"]
