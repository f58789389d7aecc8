#!/usr/bin/env bash
# The GPU benchmark on an offline H100/H200 machine with vLLM 0.26 carried in `.gpu/`.
#
# Run from the repository root, with `.gpu/` (git-ignored) holding:
#   vllm-0.26.0-sm90.tar.xz + device_env.sh   ../shared/gpu/build_carry.sh .gpu (see ../shared/gpu)
#   extra/*.whl   what the device image lacks: pydantic-settings + python-dotenv (postroom.settings),
#                 and vLLM's batch runner's imports; fetched here once with
#     pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_28_x86_64 -d .gpu/extra pydantic-settings==2.16.3 \
#       python-dotenv==1.2.4 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 \
#       attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 \
#       annotated-doc==0.0.7 httpcore2==2.16.2 truststore==0.10.5 jmespath==1.1.0 \
#       py-cpuinfo==9.0.0 python-multipart==0.0.34 uvicorn==0.54.0 uvloop==0.23.0 \
#       watchfiles==1.3.0 prometheus_client==0.26.0 prometheus-fastapi-instrumentator==8.1.0 \
#       model-hosting-container-standards==0.1.16
#
# Through the device tool (10 minutes a command): one shape per call,
#   run(command="bash bench/gpu/run_on_device.sh --shapes 0.5b --budget-s 560", carry=[".gpu"])
#   run(command="bash bench/gpu/run_on_device.sh --shapes 1.5b --budget-s 560", carry=[".gpu"])
# then, here: python bench/gpu/run.py --merge 0.5b.json 1.5b.json --out bench/results/gpu.json
# On a machine of your own, no arguments: both shapes, every mode (~16 minutes).
# Extra arguments go to bench/gpu/run.py. Results: $OUT/gpu.json, $OUT/bench.log (the children's
# vLLM logs too); OUT defaults to bench/results.
set -eo pipefail
source .gpu/device_env.sh .gpu
if [ ! -d /tmp/extra/pydantic_settings ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/extra .gpu/extra/*.whl
fi
# The bundle first (device_env.sh), then the image's own packages, then the extra wheels only
# where the image has none, then the repository.
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export PYTHONPATH="/tmp/site:$SITE:/tmp/extra:$PWD"
export OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv \
  | tee "$OUT/nvidia-smi.csv"
python3 -c "import vllm, torch, pydantic_settings; print('vllm', vllm.__version__, 'torch', torch.__version__)"
python3 bench/gpu/run.py --device cuda --work-dir /tmp/postroom-bench --log "$OUT/bench.log" \
  --out "$OUT/gpu.json" "$@"
