"""OpenAI compatibility: the Files and Batch APIs (/v1/files, /v1/batches) over Postroom jobs."""
