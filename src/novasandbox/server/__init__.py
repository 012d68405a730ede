"""The HTTP service: ``novasandbox serve``. It owns sandboxes (``AsyncSandbox`` on its
event loop) on behalf of API keys and serves them over HTTP.

- ``keys``: API keys (hashed at rest) and their store;
- ``models``: the JSON it takes and gives (its OpenAPI description);
- ``registry``: the sandboxes it owns, by owner;
- ``streams``: bodies sent while they are made (command events as NDJSON, downloads);
- ``metrics``: its Prometheus metrics (a registry per app);
- ``mcp``: MCP tools for AI agents over a registry (stdio for ``novasandbox mcp``,
  streamable HTTP at ``/mcp``);
- ``app``: the FastAPI application (routes, authentication, errors);
- ``serve``: uvicorn, binding rules, structured logs, a clean stop.

Nothing of the library imports this package; it may use all of the library. This module
imports nothing, so ``novasandbox.server.keys`` stays cheap for the CLI.
"""
