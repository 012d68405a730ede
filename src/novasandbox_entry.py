"""The ``novasandbox`` console script. It must start in milliseconds: the commands that go
through a server are run by ``novasandbox_servercli`` (the standard library only);
everything else imports the full CLI, ``novasandbox.cli``, and only then (click; each of
its commands imports what it needs of rich and the library when it runs)."""

from __future__ import annotations

import sys

from novasandbox_servercli import dispatch

TYPE_CHECKING = False  # typing's import costs milliseconds; mypy knows this name
if TYPE_CHECKING:
    from typing import Any


def _full_cli() -> Any:
    from novasandbox.cli import cli_group  # click; each command imports what it needs

    return cli_group


def main() -> Any:
    return dispatch(_full_cli)


if __name__ == "__main__":
    sys.exit(main())
