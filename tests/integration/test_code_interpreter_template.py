"""The shipped ``code-interpreter`` template on real VMs: built by the real CLI (``novasandbox
template build code-interpreter``; minutes under TCG from a fresh cache, then a no-op),
then ``run_code`` with numpy, pandas and matplotlib in a sandbox of it: a plot comes
back as a real PNG, a DataFrame as HTML and text."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys

import pytest

from novasandbox import Execution, Sandbox, TemplateManager

from .conftest import SandboxFactory

NAME = "code-interpreter"
CLI = [sys.executable, "-m", "novasandbox.cli"]
BUILD_TIMEOUT = 3600.0
"""Seconds the build may take: pip installs numpy, pandas and matplotlib in a TCG VM."""
CODE_TIMEOUT = 300.0
"""Seconds a first import of matplotlib or pandas may take under TCG."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def build() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "template", "build", NAME],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )


@pytest.fixture(scope="module")
def built() -> None:
    done = build()
    assert done.returncode == 0, done.stdout + done.stderr
    assert TemplateManager().built(NAME) is not None


@pytest.fixture(scope="module")
def sb(built: None, module_factory: SandboxFactory) -> Sandbox:
    return module_factory.create(NAME)


def png_size(b64: str) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (it must be a PNG)."""
    data = base64.b64decode(b64, validate=True)
    assert data[:8] == PNG_MAGIC, data[:16]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def pngs(execution: Execution) -> list[str]:
    assert execution.error is None, execution.error
    return [r.png for r in execution.results if r.png is not None]


def test_a_second_build_is_a_no_op(built: None) -> None:
    done = build()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{NAME}: up to date" in done.stdout


def test_a_plot_comes_back_as_a_png(sb: Sandbox) -> None:
    execution = sb.run_code(
        "import matplotlib.pyplot as plt; plt.plot([1, 2, 3]); plt.show()", timeout=CODE_TIMEOUT
    )
    [png] = pngs(execution)
    width, height = png_size(png)
    assert 100 <= width <= 4000 and 100 <= height <= 4000, (width, height)
    # the figure was closed once rendered: the next execution has none
    assert pngs(sb.run_code("1", timeout=CODE_TIMEOUT)) == []


def test_a_figure_as_the_last_expression_is_a_png(sb: Sandbox) -> None:
    execution = sb.run_code(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(4, 3), dpi=100)\n"
        "ax.bar(['a', 'b'], [3, 5])\n"
        "fig",
        timeout=CODE_TIMEOUT,
    )
    [png] = pngs(execution)
    width, height = png_size(png)
    # bbox_inches="tight" trims the margins of the 400x300 figure
    assert 200 <= width <= 400 and 150 <= height <= 300, (width, height)
    assert any(r.is_main_result and "Figure" in (r.text or "") for r in execution.results)


def test_matplotlib_renders_off_screen_in_commands_too(sb: Sandbox) -> None:
    script = "import os, matplotlib; print(os.environ['MPLBACKEND'], matplotlib.get_backend())"
    result = sb.commands.run(["python3", "-c", script], timeout=CODE_TIMEOUT)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == ["Agg", "Agg"]


def test_a_dataframe_comes_back_as_html_and_text(sb: Sandbox) -> None:
    execution = sb.run_code(
        "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [4, 19]})",
        timeout=CODE_TIMEOUT,
    )
    assert execution.error is None, execution.error
    [main] = [r for r in execution.results if r.is_main_result]
    assert main.html is not None and "<table" in main.html and "Lima" in main.html
    assert main.text is not None and "city" in main.text and "Oslo" in main.text


def test_numpy_works(sb: Sandbox) -> None:
    execution = sb.run_code(
        "import numpy as np\n"
        "a = np.array([[3.0, 1.0], [1.0, 2.0]])\n"
        "x = np.linalg.solve(a, np.array([9.0, 8.0]))\n"
        "[float(v) for v in x], int(np.arange(10).sum())",
        timeout=CODE_TIMEOUT,
    )
    assert execution.error is None, execution.error
    assert execution.text == "([2.0, 3.0], 45)"
