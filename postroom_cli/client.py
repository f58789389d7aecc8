"""A thin httpx client of the Postroom API, used by the CLI commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") or str(body)
        details = error.get("details") or []
        lines = [f"HTTP {status}: {message}"]
        lines += [f"  - {json.dumps(d, ensure_ascii=False)}" for d in details[:20]]
        super().__init__("\n".join(lines))


class Client:
    def __init__(self, base_url: str, key: str, *, timeout: float = 60.0) -> None:
        self.http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, body)
        return response.json()

    def upload(self, path: Path, params: dict[str, Any]) -> dict[str, Any]:
        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(1 << 16):
                    yield chunk

        response = self.http.post(
            "/v1/jobs/upload",
            params={k: v for k, v in params.items() if v is not None},
            content=chunks(),
            headers={"Content-Type": "application/x-ndjson"},
            timeout=httpx.Timeout(600.0, connect=10.0),
        )
        result: dict[str, Any] = self._check(response)
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self.http.get(f"/v1/jobs/{job_id}"))
        return result

    def jobs(self, limit: int = 20) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self.http.get("/v1/jobs", params={"limit": limit}))
        return result

    def status(self) -> dict[str, Any]:
        """GET /v1/status: the caller's jobs and the deployment's queues, workers and spill."""
        result: dict[str, Any] = self._check(self.http.get("/v1/status"))
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self.http.post(f"/v1/jobs/{job_id}/cancel"))
        return result

    def results(
        self, job_id: str, *, only_failed: bool = False, format: str = "jsonl"
    ) -> Iterator[Any]:
        """JSONL lines as dicts; `format="csv"` yields the CSV's text lines."""
        params = {"only": "failed"} if only_failed else {}
        if format != "jsonl":
            params["format"] = format
        with self.http.stream("GET", f"/v1/jobs/{job_id}/results", params=params) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line) if format == "jsonl" else line

    def download_results(
        self, job_id: str, out: IO[bytes], *, format: str, only_failed: bool = False
    ) -> int:
        """Stream the results in `format` into `out`; returns the bytes written."""
        params = {"format": format, **({"only": "failed"} if only_failed else {})}
        size = 0
        with self.http.stream("GET", f"/v1/jobs/{job_id}/results", params=params) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            for chunk in response.iter_bytes(1 << 16):
                out.write(chunk)
                size += len(chunk)
        return size

    def webhooks(self) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self.http.get("/v1/webhooks"))
        return result

    def set_webhook(self, url: str | None) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self.http.put("/v1/webhooks", json={"url": url}))
        return result

    def job_webhooks(self, job_id: str) -> list[dict[str, Any]]:
        result: dict[str, Any] = self._check(self.http.get(f"/v1/jobs/{job_id}/webhooks"))
        return list(result["data"])

    def delete(self, job_id: str) -> str:
        """DELETE /v1/jobs/{id}: what the API says it did."""
        response = self.http.delete(f"/v1/jobs/{job_id}")
        if response.status_code == 204:
            return f"job {job_id} deleted"
        result = self._check(response)
        return str(result.get("message", result))
