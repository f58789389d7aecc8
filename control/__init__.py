"""The `postroom beat` process: Celery beat plus one worker thread on the `control` queue, running
the reaper, the router and the S3 drop folder. It imports `postroom` only; `api` and `worker`
never import it."""
