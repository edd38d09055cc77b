"""The task worker process kind: slow jobs off the WebSocket workers' event loops.

It imports the shared layer (`shoal.core`) and config, never `shoal.workers` or
`shoal.server`; the import-linter contracts in pyproject.toml hold it to that.
"""
