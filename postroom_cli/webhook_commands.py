"""`postroom webhooks`: show or set the tenant's webhook target and secret, and `verify`, which a
receiver runs to check a delivery's signature (Standard Webhooks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from postroom.webhook_signing import WebhookVerificationError, verify
from postroom_cli.client import ApiError
from postroom_cli.job_commands import ApiKey, ApiUrl, _client
from postroom_cli.terminal import console, err

webhooks_app = typer.Typer(help="Webhooks: target, secret, signature checks.", no_args_is_help=True)


@webhooks_app.command("show")
def show(api_url: ApiUrl = None, key: ApiKey = None) -> None:
    """Print the tenant's default webhook URL and its signing secret (JSON)."""
    try:
        body = _client(api_url, key).webhooks()
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    print(json.dumps(body))


@webhooks_app.command("set")
def set_url(
    url: Annotated[str, typer.Argument(help="https URL; 'none' turns the default off")],
    api_url: ApiUrl = None,
    key: ApiKey = None,
) -> None:
    """Set the default target of the tenant's job events (a job's own webhook_url wins)."""
    try:
        body = _client(api_url, key).set_webhook(None if url == "none" else url)
    except ApiError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    console.print(f"webhook URL: {body['url']}")


@webhooks_app.command("verify")
def verify_command(
    secret: Annotated[str, typer.Option(help="the tenant's secret (whsec_…)")],
    webhook_id: Annotated[str, typer.Option("--id", help="the webhook-id header")],
    timestamp: Annotated[str, typer.Option(help="the webhook-timestamp header")],
    signature: Annotated[str, typer.Option(help="the webhook-signature header")],
    body: Annotated[Path | None, typer.Option(help="the raw request body (default: stdin)")] = None,
    tolerance: Annotated[float, typer.Option(help="max age of the timestamp, seconds")] = 300.0,
) -> None:
    """Check a received webhook: exit 0 and print `ok` when the signature matches, else exit 1
    saying why. Pass the body exactly as received."""
    raw = body.read_bytes() if body is not None else sys.stdin.buffer.read()
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": signature,
    }
    try:
        verify(secret, headers, raw, tolerance=tolerance)
    except WebhookVerificationError as e:
        err.print(f"[red]not verified: {e}[/]")
        raise typer.Exit(1) from e
    print("ok")
