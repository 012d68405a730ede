"""Files in the sandbox, and a host disk image attached read-only as an extra drive.

Run:  .venv/bin/python examples/files_and_drives.py   (needs mke2fs: apt-get install e2fsprogs)

Builds a 16 MiB ext4 image from a host folder with ``mke2fs -d``, mounts it at /data
in the guest, reads from it and shows that writes there are refused.
"""

import subprocess
import tempfile
from pathlib import Path

from novasandbox import Drive, ReadOnlyFilesystem, Sandbox

with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp, "content")
    src.mkdir()
    (src / "hello.txt").write_text("hello from the host image\n")
    image = Path(tmp, "data.img")
    image.touch()  # else mke2fs says "Creating regular file" despite -q
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(src), str(image), "16M"], check=True)

    with Sandbox.create("python", drives=[Drive(image, mount="/data", read_only=True)]) as sb:
        # Text and bytes, parents created as needed; relative paths are under the home of
        # the account the call acts as (``user``, /home/user, in the python template).
        sb.files.write("work/notes/readme.txt", "written from the host\n")
        sb.files.write("work/blob.bin", bytes(range(256)))
        print("text:  ", sb.files.read("work/notes/readme.txt").strip())
        blob = sb.files.read("work/blob.bin", format="bytes")
        print("bytes: ", len(blob), "bytes, round trip ok:", blob == bytes(range(256)))
        for entry in sb.files.list("work"):
            print(f"  {entry.type:4} {entry.size:6} {entry.path}")
        sb.files.make_dir("work/empty")
        sb.files.remove("work/blob.bin")
        print("exists:", sb.files.exists("work/empty"), sb.files.exists("work/blob.bin"))

        # The drive: readable through the files API and from commands.
        print("drive: ", sb.files.read("/data/hello.txt").strip())
        print("mount: ", sb.commands.run("grep ' /data ' /proc/mounts").stdout.strip())

        # Writes to the read-only drive fail, through either door, even as root.
        try:
            sb.files.write("/data/new.txt", "nope", user="root")
        except ReadOnlyFilesystem as exc:
            print("files.write refused:", exc)
        result = sb.commands.run("echo x > /data/new.txt", user="root")
        print(f"shell write: exit {result.exit_code}, {result.stderr.strip()}")
