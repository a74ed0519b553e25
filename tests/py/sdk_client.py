"""Drives dynogate with the official MCP Python SDK, as a user would.

usage: sdk_client.py (http|auto|sse) URL

Lists the tools, runs `print(2+2)` with code_exec_python, and prints one JSON
line: {"tools": [...], "result": {returncode, stdout, stderr}}. Works with
the SDK's 1.x and 2.x lines; `auto` uses the 2.x `Client`, which probes
`server/discover` before falling back to `initialize`.
"""

import asyncio
import json
import sys

from mcp import ClientSession


async def exercise(session):
    tools = await session.list_tools()
    result = await session.call_tool("code_exec_python", {"code": "print(2+2)"})
    return {"tools": [tool.name for tool in tools.tools], "result": json.loads(result.content[0].text)}


async def over_streamable_http(url):
    try:
        from mcp.client.streamable_http import streamable_http_client as connect
    except ImportError:  # the 1.x name
        from mcp.client.streamable_http import streamablehttp_client as connect
    async with connect(url) as streams:
        async with ClientSession(streams[0], streams[1]) as session:
            await session.initialize()
            return await exercise(session)


async def with_probe(url):
    from mcp.client.client import Client

    async with Client(url) as client:
        tools = await client.list_tools()
        result = await client.call_tool("code_exec_python", {"code": "print(2+2)"})
        return {"tools": [tool.name for tool in tools.tools], "result": json.loads(result.content[0].text)}


async def over_sse(url):
    from mcp.client.sse import sse_client

    async with sse_client(url) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await exercise(session)


MODES = {"http": over_streamable_http, "auto": with_probe, "sse": over_sse}

if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    report = asyncio.run(asyncio.wait_for(MODES[mode](url), timeout=60))
    print(json.dumps(report))
