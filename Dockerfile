# Images for a fleet: the cloud aggregator and the device agent, from one multi-stage build.
#
#   docker build --target aggregator -t fedmask-aggregator .
#   docker build --target agent      -t fedmask-agent .
#
# Both run as the unprivileged user `fedmask` in /var/lib/fedmask (a volume: the agent's state file,
# a SQLite store if one is used). Arguments after the image name go to the entrypoint, e.g.
#   docker run fedmask-agent --broker mqtts://broker:8883 --ca-file /run/secrets/ca.crt ...
# See docs/deployment.md.

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
# The aggregator needs it too: it derives the weights digest for the task and sizes the masks.
FROM base AS torch
RUN pip install torch==2.13.0

# --- cloud aggregator: the SQL store (SQLite or PostgreSQL) -----------------------------------------
FROM torch AS aggregator
COPY --from=build /wheels/ /tmp/wheels/
RUN pip install "$(ls /tmp/wheels/fedmask-*.whl)[store]" && rm -rf /tmp/wheels
USER fedmask
WORKDIR /var/lib/fedmask
VOLUME ["/var/lib/fedmask"]
ENTRYPOINT ["fedmask", "aggregator", "run"]

# --- device agent: training, TFLite export and the TFLite runtime -----------------------------------
FROM torch AS agent
COPY --from=build /wheels/ /tmp/wheels/
RUN pip install "$(ls /tmp/wheels/fedmask-*.whl)[runtime,train]" && rm -rf /tmp/wheels
USER fedmask
WORKDIR /var/lib/fedmask
VOLUME ["/var/lib/fedmask"]
ENTRYPOINT ["fedmask", "agent", "run"]
