"""`python -m postroom_cli` is the same as `postroom`."""

from postroom_cli.main import app

app()
