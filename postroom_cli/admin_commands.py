"""Operator commands that work on the database directly: `keys` (API keys per tenant), `tenants`
(weights, priorities, quotas) and `inbox` (what the S3 drop folder has seen)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from postroom.settings import get_settings
from postroom_cli.terminal import console, err

keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
tenants_app = typer.Typer(
    help="Tenants: fair-share weight, maximum priority and quotas.", no_args_is_help=True
)
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


@tenants_app.command("list")
def tenants_list(
    name: Annotated[str | None, typer.Argument(help="one tenant")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Each tenant's effective weight, maximum priority and quotas (0 = no limit), its own
    overrides (marked *), and its current use."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.quotas import tenant_overview

    settings = get_settings()
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as session:
        rows = tenant_overview(session=session, settings=settings, name=name)
    engine.dispose()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table()
    columns = ("tenant", "weight", "max priority", "docs waiting", "docs/day", "running shards")
    for column in columns:
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for row in rows:
        eff, own, use = row["effective"], row["overrides"], row["use"]
        table.add_row(
            row["name"],
            _cell(own, "weight", eff["weight"]),
            _cell(own, "max_priority", eff["max_priority"]),
            _cell(own, "quota_docs_waiting", eff["docs_waiting"], use["docs_waiting"]),
            _cell(own, "quota_docs_per_day", eff["docs_per_day"], use["docs_today"]),
            _cell(own, "quota_running_shards", eff["running_shards"], use["running_shards"]),
        )
    console.print(table)


def _cell(own: dict[str, Any], field: str, value: object, used: int | None = None) -> str:
    """A limit (`used / limit` for quotas, ∞ for none), starred when the tenant overrides it."""
    star = "*" if own[field] is not None else ""
    return f"{used:,} / {value or '∞'}{star}" if used is not None else f"{value}{star}"


@tenants_app.command("set")
def tenants_set(
    name: str,
    weight: Annotated[float | None, typer.Option(help="fair-share weight (> 0)")] = None,
    max_priority: Annotated[
        str | None, typer.Option(help="highest priority its jobs may ask: high, normal, low")
    ] = None,
    docs_waiting: Annotated[int | None, typer.Option(help="quota: documents waiting")] = None,
    docs_per_day: Annotated[int | None, typer.Option(help="quota: documents per day")] = None,
    running_shards: Annotated[int | None, typer.Option(help="quota: shards running")] = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(help="put a field back to the deployment's setting (repeatable)"),
    ] = None,
) -> None:
    """Set a tenant's weight, maximum priority and quotas (0 = no limit; created if new)."""
    from postroom.db.session import make_engine, make_sessionmaker
    from postroom.errors import InvalidInput
    from postroom.quotas import set_overrides

    given = {
        "weight": weight,
        "max_priority": max_priority,
        "quota_docs_waiting": docs_waiting,
        "quota_docs_per_day": docs_per_day,
        "quota_running_shards": running_shards,
    }
    changes: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    changes.update(dict.fromkeys(clear or []))
    engine = make_engine(get_settings())
    try:
        with make_sessionmaker(engine).begin() as session:
            set_overrides(session=session, name=name, changes=changes)
    except InvalidInput as e:
        err.print(e.message)
        raise typer.Exit(2) from e
    finally:
        engine.dispose()
    tenants_list(name=name, as_json=False)
