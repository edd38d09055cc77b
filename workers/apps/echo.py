"""The built-in echo application: every frame goes back verbatim, text as text, binary as binary.

No welcome, no JSON: it measures and tests the transport itself.
"""

from __future__ import annotations

from shoal.core.app import App, Connection

app = App()


@app.on_frame
async def echo(conn: Connection, data: str | bytes) -> None:
    if isinstance(data, str):
        await conn.send_text(data)
    else:
        await conn.send_bytes(data)
