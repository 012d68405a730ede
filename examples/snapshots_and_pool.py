"""Fast start: snapshots, forks and a warm pool.

Run:  .venv/bin/python examples/snapshots_and_pool.py   (needs the "python" template built)

`Sandbox.create` restores the template's snapshot by default (about a tenth of a second
here, under software emulation) and `cold=True` boots the kernel instead. A sandbox can be
paused, saved with `snapshot()` (memory, processes and files) and restored any number of
times, or forked into independent copies. A `Pool` keeps sandboxes ready for instant use.
"""

import time

from novasandbox import Pool, Sandbox, delete_snapshot

t0 = time.monotonic()
with Sandbox.create("python") as sb:
    print(f"restored={sb.restored} in {time.monotonic() - t0:.2f} s")
    sb.files.write("/home/user/notes.txt", "written before the snapshot\n")
    sb.commands.run("python3 -c 'print(sum(range(10**6)))' > /home/user/result.txt", check=True)

    sb.pause()
    print("state while paused:", sb.state)
    sb.resume()

    snap = sb.snapshot()
    print(f"snapshot {snap.id}: {snap.size_bytes / 1e6:.0f} MB, saved in {snap.save_seconds} s")
    with Sandbox.create(from_snapshot=snap) as clone:
        print("clone sees:", clone.files.read("/home/user/notes.txt").strip())
    delete_snapshot(snap)

    children = sb.fork(2)
    for i, child in enumerate(children):
        child.files.write("/home/user/who", f"child {i}")
    print("forks:", [c.files.read("/home/user/who") for c in children])
    print("fork sees parent's result:", children[0].files.read("/home/user/result.txt").strip())
    for child in children:
        child.kill()

with Pool("python", size=2) as pool:
    while pool.ready < 2:
        time.sleep(0.05)
    t0 = time.monotonic()
    sb = pool.acquire()
    print(f"pool hand-over in {(time.monotonic() - t0) * 1000:.1f} ms")
    print(sb.commands.run("echo from the pool").stdout.strip())
    sb.kill()
