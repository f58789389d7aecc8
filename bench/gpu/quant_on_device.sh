#!/usr/bin/env bash
# bench/gpu/quant.py (FP8 vs bf16) on the offline H200, with vLLM 0.26 carried in `.gpu/` as for
# bench/gpu/run_on_device.sh (read it first), plus the SmolLM2 GGUF file carried in parts.
#
# Here, once (the GGUF file is 94 MiB; one call carries at most 64 MiB, .gpu/ alone ~58 MiB):
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/extra \
#     gguf==0.19.0 accelerate==1.16.0
#   G=$(.venv/bin/python -c 'from worker.gguf_model import smollm2_gguf; print(smollm2_gguf())')
#   mkdir -p .gpu-smol-1 .gpu-smol-2 && split -b 47M "$G" /tmp/smollm2.part-
#   mv /tmp/smollm2.part-aa .gpu-smol-1/ && mv /tmp/smollm2.part-a[b-z] .gpu-smol-2/
#   (add /.gpu-smol-*/ to .git/info/exclude)
# Then through the device tool, calls back to back (each within 30 s of the last; /tmp survives):
#   run(command="bash bench/gpu/quant_on_device.sh --stage-only", carry=[".gpu"])
#   run(command="bash bench/gpu/quant_on_device.sh --stage-only", carry=[".gpu-smol-1"])
#   run(command="bash bench/gpu/quant_on_device.sh --models smollm2 --docs 0", carry=[".gpu-smol-2"])
#   run(command="bash bench/gpu/quant_on_device.sh --models 1.5b --docs 4000")
# After a call of bench/gpu/stack/run_on_device.sh on the same machine, the random-weight shapes
# need no carry at all (the services archive it unpacked has pydantic-settings). On a fresh
# machine, one call does them: .gpu/extra with only the wheels they need beyond the vLLM bundle
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/extra \
#     pydantic-settings==2.16.3 python-dotenv==1.2.4 compressed-tensors==0.17.0 loguru==0.7.3
#   run(command="bash bench/gpu/quant_on_device.sh --models 1.5b --docs 4000",
#       carry=[".gpu/vllm-0.26.0-sm90.tar.xz", ".gpu/device_env.sh", ".gpu/extra"])
# `--models smollm2` means the joined GGUF file; other arguments go to bench/gpu/quant.py.
# Results: $OUT/quant-*.json (OUT defaults to bench/results), the engines' logs in $OUT.
set -eo pipefail
source .gpu/device_env.sh .gpu
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
if [ -d /tmp/services/pydantic_settings ] && [ ! -d .gpu/extra ]; then
  # The stack's services archive is unpacked (bench/gpu/stack/run_on_device.sh ran on this
  # machine): it has what the random-weight shapes need (not gguf: no smollm2 this way).
  export PYTHONPATH="/tmp/site:$SITE:/tmp/services:$PWD"
else
  if [ ! -d /tmp/extra/pydantic_settings ] || [ ! -d /tmp/extra/gguf ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/extra .gpu/extra/*.whl
  fi
  export PYTHONPATH="/tmp/site:$SITE:/tmp/extra:$PWD"
fi
export OUT=${OUT:-$PWD/bench/results}
mkdir -p "$OUT" /tmp/smol
for dir in .gpu-smol-*; do
  if [ -d "$dir" ]; then cp "$dir"/smollm2.part-* /tmp/smol/; fi
done
if [ "${1:-}" = "--stage-only" ]; then
  ls -la /tmp/smol
  exit 0
fi
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # postroom.settings
if [ ! -f "$GGUF" ] && ls /tmp/smol/smollm2.part-* >/dev/null 2>&1; then
  cat /tmp/smol/smollm2.part-* > "$GGUF"
  echo "$SHA  $GGUF" | sha256sum -c
fi
ARGS=()
for arg in "$@"; do
  ARGS+=("${arg//smollm2/smollm2=$GGUF}")
done
NAME=$(echo "$*" | tr -c 'a-z0-9.' '-' | cut -c1-40)
python3 bench/gpu/quant.py --device cuda --work-dir /tmp/postroom-quant \
  --labelled postroom/data/support_tickets.jsonl --out "$OUT/quant-$NAME.json" "${ARGS[@]}"
cp /tmp/postroom-quant/quant.log "$OUT/quant-$NAME.log"
