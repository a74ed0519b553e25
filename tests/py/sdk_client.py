"""Drives dynogate with the official MCP Python SDK, as a user would.

usage: sdk_client.py (http|auto|sse) URL [install]

Lists the tools, runs `print(2+2)` with code_exec_python, and prints one JSON
line: {"tools": [...], "result": {returncode, stdout, stderr}}. With
`install` (streamable HTTP only) it also runs code, installs numpy with it
and runs again in the same session, adding "steps": [result, ...]. Works with
the SDK's 1.x and 2.x lines; `auto` uses the 2.x `Client`, which probes
`server/discover` before falling back to `initialize`. An API key in
MCP_API_KEY is sent as a bearer token.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession

INSTALL_STEPS = [
    ({"code": "import sys; print(sys.executable)"}),
    ({"code": "import numpy; print(int(numpy.arange(5).sum()))", "packages": ["numpy"]}),
    ({"code": "import numpy, sys; print(numpy.__version__ > '1', sys.prefix.endswith('.venv'))"}),
]


async def exercise(session):
    tools = await session.list_tools()
    result = await session.call_tool("code_exec_python", {"code": "print(2+2)"})
    report = {"tools": [tool.name for tool in tools.tools], "result": json.loads(result.content[0].text)}
    if SCENARIO == "install":
        report["steps"] = []
        for arguments in INSTALL_STEPS:
            step = await session.call_tool("code_exec_python", arguments)
            report["steps"].append(json.loads(step.content[0].text))
    return report


def headers():
    key = os.environ.get("MCP_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else None


async def over_streamable_http(url):
    try:
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        connect = lambda url: streamable_http_client(url, http_client=create_mcp_http_client(headers=headers()))
    except ImportError:  # the 1.x name
        from mcp.client.streamable_http import streamablehttp_client

        connect = lambda url: streamablehttp_client(url, headers=headers())
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

    async with sse_client(url, headers=headers()) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await exercise(session)


MODES = {"http": over_streamable_http, "auto": with_probe, "sse": over_sse}

SCENARIO = sys.argv[3] if len(sys.argv) > 3 else "hello"

if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    report = asyncio.run(asyncio.wait_for(MODES[mode](url), timeout=150 if SCENARIO == "install" else 60))
    print(json.dumps(report))
