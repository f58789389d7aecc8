"""Where the CLI writes: `console` (stdout) for what a command reports, `err` (stderr) for
progress bars, warnings and errors."""

from __future__ import annotations

from rich.console import Console

console = Console()
err = Console(stderr=True)
