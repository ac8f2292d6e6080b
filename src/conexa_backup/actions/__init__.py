"""Actions: orchestration of one command each. No Typer, no terminal: they return results."""
