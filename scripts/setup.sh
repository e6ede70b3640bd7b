#!/usr/bin/env bash
# One-time setup on a fresh Debian/Ubuntu machine (idempotent; quick when everything is there):
# system packages (Mosquitto, RabbitMQ for the cluster tests, Fashion-MNIST), a virtualenv in .venv
# with the project and its dev tools, and, for the tests, a running PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

want_services="${1:-}"   # "--services": also make sure PostgreSQL is running (the tests need it)

apt_packages=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_packages+=(mosquitto)
# The clustered-broker tests start RabbitMQ nodes of their own (MQTT plugin); none is left running.
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || apt_packages+=(rabbitmq-server)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_packages+=(dataset-fashion-mnist)
if ((${#apt_packages[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${apt_packages[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  else
    echo "setup: please install: sudo apt-get install ${apt_packages[*]}" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.fedmask-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip setuptools wheel
  # The CPU build of PyTorch; an unpinned torch would pull several GB of CUDA packages.
  .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

if [ "$want_services" = "--services" ] && command -v pg_ctlcluster >/dev/null 2>&1; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "setup: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi
