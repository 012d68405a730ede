"""The ``novasandbox`` console script. It must start in milliseconds: the commands that go
through a server are run by ``novasandbox_servercli`` (the standard library only);
everything else imports the full CLI, ``novasandbox.cli`` (click, rich, the library),
and only then."""

from __future__ import annotations

import sys
from typing import Any

from novasandbox_servercli import dispatch


def _full_cli() -> Any:
    from novasandbox.cli import cli_group  # the library's import costs ~0.3 s: only here

    return cli_group


def main() -> Any:
    return dispatch(_full_cli)


if __name__ == "__main__":
    sys.exit(main())
