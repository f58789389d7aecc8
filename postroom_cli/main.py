"""`postroom`: the one command that starts every process and talks to the API.

The commands live with what they own (server_commands, job_commands, admin_commands); this module
puts them on the one `app` that the `postroom` script runs, in the order `--help` lists them.
"""

from __future__ import annotations

import typer

from postroom_cli import (
    admin_commands,
    job_commands,
    plan_command,
    server_commands,
    webhook_commands,
)

app = typer.Typer(help="Postroom: classify documents in bulk.", no_args_is_help=True)

for name, command in (
    ("migrate", server_commands.migrate),
    ("api", server_commands.api),
    ("worker", server_commands.worker),
    ("beat", server_commands.beat),
    ("flower", server_commands.flower),
    ("up", server_commands.up),
    ("down", server_commands.down),
    ("submit", job_commands.submit),
    ("status", job_commands.status),
    ("results", job_commands.results),
    ("cancel", job_commands.cancel),
    ("delete", job_commands.delete),
    ("eval", job_commands.eval_),
    ("demo", job_commands.demo),
    ("plan", plan_command.plan),
):
    app.command(name)(command)
app.add_typer(admin_commands.keys_app, name="keys")
app.add_typer(admin_commands.tenants_app, name="tenants")
app.add_typer(server_commands.model_app, name="model")
app.add_typer(admin_commands.inbox_app, name="inbox")
app.add_typer(webhook_commands.webhooks_app, name="webhooks")
