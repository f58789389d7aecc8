#!/usr/bin/env bash
# The whole stack on an offline H100/H200 machine (Python 3.12, torch 2.11+cu130, no network, at most
# 64 MiB carried a call), from the repository root. The carry folder (CARRY, default .gpu, ignored by
# git) holds vllm-0.26.0-sm90.tar.xz + device_env.sh (../shared/gpu/build_carry.sh) and
# services-cp312.tar.xz (bench/gpu/stack/build_services.sh .gpu). Both together are over 64 MiB, so
# two calls back to back (the machine keeps /tmp while it stays held, 30 s after a call):
#   run(command="bash bench/gpu/stack/run_on_device.sh --unpack vllm",
#       carry=[".gpu/vllm-0.26.0-sm90.tar.xz", ".gpu/device_env.sh"])
#   run(command="bash bench/gpu/stack/run_on_device.sh --shapes 0.5b --docs 30000",
#       carry=[".gpu/services-cp312.tar.xz", ".gpu/device_env.sh"])
# Later calls on the same machine need no carry. Arguments go to bench/gpu/stack/run.py; results:
# $OUT/gpu-stack.json and $OUT/stack.log (OUT defaults to bench/results). On a machine with internet
# none of this is needed: pip install -e ".[gpu]"; python bench/gpu/stack/run.py.
set -eo pipefail
CARRY=${CARRY:-.gpu}
if [ "$1" = "--unpack" ]; then
  [ "$2" = "vllm" ] && source "$CARRY/device_env.sh" "$CARRY" && echo "vLLM in /tmp/site"
  exit 0
fi
[ -d /tmp/site/vllm ] || { echo "no /tmp/site/vllm: make the --unpack vllm call first" >&2; exit 3; }
source "$CARRY/device_env.sh" "$CARRY"
if [ ! -d /tmp/services/celery ]; then
  mkdir -p /tmp/services && tar -xJf "$CARRY/services-cp312.tar.xz" -C /tmp/services
fi
# The vLLM bundle first, then the image's own packages, then the services only where the image has
# none, then the repository.
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export PYTHONPATH="/tmp/site:$SITE:/tmp/services:$PWD"
export OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import vllm, celery, sqlalchemy, psycopg, moto; print('vllm', vllm.__version__)"
rc=0
python3 bench/gpu/stack/run.py --device cuda --log "$OUT/stack.log" --out "$OUT/gpu-stack.json" "$@" || rc=$?
# Every process's log (the worker's "shard done" lines say where each shard's time went).
(cd /tmp/postroom-stack && find . -path '*/stack/logs/*.log' -print0 | tar -czf "$OUT/logs.tar.gz" --null -T -) || true
exit $rc
