"""The whole Postroom stack on one GPU machine, against the raw engine on the same documents.

`build_services.sh` (here) packs what the offline GPU machine lacks; `run.py` (there) starts the
embedded Postgres and Valkey, moto's S3 server, `postroom migrate`, `postroom api`, `postroom beat`
and one `postroom worker`, and measures per shape: (a) raw `LLM.generate` (bench/gpu's child
"raw"), (b) a streamed upload of the same documents through the API until the job is completed,
every result checked in Postgres and S3; CPU seconds per 1,000 documents per process; optional
faults mid-job. README.md, "The whole stack on a GPU", says how to run it.

    python bench/gpu/stack/run.py --shapes tiny --device cpu --docs 64      # any machine
    python bench/gpu/stack/run.py --shapes 0.5b --docs 30000                # a GPU machine
"""
