"""The basics: create a sandbox, run shell and Python code in it, handle a failing command.

Run:  .venv/bin/python examples/basic.py   (needs the "python" template built:
      .venv/bin/novasandbox template build python)

The ``with`` block kills the VM when it ends, also when an exception escapes it.
"""

from novasandbox import CommandFailed, Sandbox

with Sandbox.create("python", env={"GREETING": "hello"}) as sb:
    # A string is run by /bin/sh -c, so pipes, variables and redirections work.
    result = sb.commands.run('echo "$GREETING from $(hostname)" | tr a-z A-Z')
    print("shell:   ", result.stdout.strip(), f"(exit {result.exit_code})")

    # A list is an argv: no shell, no quoting to worry about.
    code = "import platform; print(f'{platform.python_version()} says {6 * 7}')"
    result = sb.commands.run(["python3", "-c", code])
    print("python:  ", result.stdout.strip())

    # The guest runs its own kernel, not the host's.
    print("guest kernel:", sb.commands.run(["uname", "-r"]).stdout.strip())

    # stdin, per-command environment and working directory.
    result = sb.commands.run(
        "wc -w; echo cwd=$PWD N=$N", stdin="one two three", env={"N": "7"}, cwd="/tmp"
    )
    print("stdin:   ", " ".join(result.stdout.split()))

    # A non-zero exit is a normal result by default...
    result = sb.commands.run("ls /nonexistent")
    print("ls exit: ", result.exit_code, "ok" if result.ok else "not ok")

    # ...and raises CommandFailed with check=True.
    try:
        sb.commands.run("echo 'something broke' >&2; exit 3", check=True)
    except CommandFailed as exc:
        print(f"CommandFailed: exit {exc.exit_code}, stderr {exc.result.stderr.strip()!r}")
