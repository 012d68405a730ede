"""Three AsyncSandboxes at once: each boots its own microVM and computes something different.

Run:  .venv/bin/python examples/async_many.py

``asyncio.gather`` runs the three boots concurrently, so the total is close to one boot
(on a host with enough cores). Each ``async with`` kills its VM, also on errors.
"""

import asyncio
import time

from novasandbox import AsyncSandbox

JOBS = {
    "primes": "print(sum(all(n % d for d in range(2, int(n**.5) + 1)) for n in range(2, 10000)))",
    "fib": "a, b = 0, 1\nfor _ in range(300): a, b = b, a + b\nprint(len(str(a)), 'digits')",
    "sha256": "import hashlib; print(hashlib.sha256(b'novasandbox' * 100000).hexdigest()[:16])",
}


async def run_job(name: str, code: str) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    async with await AsyncSandbox.create("python") as sb:
        result = await sb.commands.run(["python3", "-c", code], check=True)
        return name, result.stdout.strip(), time.perf_counter() - t0


async def main() -> None:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(run_job(name, code) for name, code in JOBS.items()))
    for name, output, seconds in results:
        print(f"{name:7} -> {output:24} ({seconds:.1f} s incl. boot)")
    print(f"all {len(results)} done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    asyncio.run(main())
