"""Operator commands that work on the database directly: `keys` (API keys per tenant) and
`inbox` (what the S3 drop folder has seen)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from postroom.settings import get_settings
from postroom_cli.terminal import console, err

keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
inbox_app = typer.Typer(
    help="The S3 drop folder (POSTROOM_INBOX_PREFIX/inbox/).", no_args_is_help=True
)


@keys_app.command("create")
def keys_create(
    tenant: str, admin: Annotated[bool, typer.Option(help="operator key")] = False
) -> None:
    """Create an API key for TENANT (created if new). The key is the last line of output."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.tenants import create_key

    settings = get_settings()
    engine = make_engine(settings)
    with make_sessionmaker(engine).begin() as session:
        key = create_key(session=session, tenant=tenant, admin=admin)
    engine.dispose()
    err.print(f"API key for tenant {tenant!r} (shown once; store it safely):")
    print(key)


@keys_app.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke every key with this prefix (the 8 hex characters after `pr_`)."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.tenants import revoke_key

    engine = make_engine(get_settings())
    with make_sessionmaker(engine).begin() as session:
        count = revoke_key(session=session, prefix=prefix)
    engine.dispose()
    console.print(f"revoked {count} key(s)")


@inbox_app.command("status")
def inbox_status(
    state: Annotated[
        str | None, typer.Option(help="only seen, ingested, running, done or failed")
    ] = None,
    limit: Annotated[int, typer.Option(help="objects to list, newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """What the drop folder has seen, ingested, is running, finished or failed (and why), read
    from Postgres."""
    from control.inbox import inbox_report
    from postroom.db.session import make_engine, make_sessionmaker

    engine = make_engine(get_settings())
    with make_sessionmaker(engine)() as session:
        report = inbox_report(session=session, state=state, limit=limit)
    engine.dispose()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(" · ".join(f"{name} {count}" for name, count in report["counts"].items()))
    table = Table()
    for column in ("key", "state", "job", "seen", "reason"):
        table.add_column(column, overflow="fold")
    for obj in report["objects"]:
        job = f"{obj['job_id']} ({obj['job_status']})" if obj["job_id"] else ""
        table.add_row(obj["key"], obj["state"], job, obj["seen_at"][:19], obj["reason"] or "")
    console.print(table)
