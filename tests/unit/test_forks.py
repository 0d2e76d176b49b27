"""A forked pool ending its workers must not stop the service that forked it (the feedback+trainer process
exited at its first label check: cleanlab's pool SIGTERMs its workers, and they shared the loop's wakeup
socket). The service runs in a subprocess of its own, so its signal handling is its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SERVICE = textwrap.dedent(
    """
    import asyncio, multiprocessing, os, signal, sys, time
    from flockwatch.cli.runtime import run_workers
    from flockwatch.common.bus import create_bus
    from flockwatch.common.service import Service
    from flockwatch.common.settings import CommonSettings

    def pool_work() -> None:  # what cleanlab, joblib and scikit-learn do: a fork pool, ended with SIGTERM
        pool = multiprocessing.get_context("fork").Pool(2)
        pool.map(abs, range(8))
        pool.terminate()
        pool.join()

    def fork_work() -> None:  # the same signal, deterministically: a forked child told to stop
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGTERM)
        child.join(3)
        if child.is_alive():  # (it ignored SIGTERM: the parent's handler, inherited)
            child.kill()
            child.join()

    class Forker(Service):
        name = "forker"

        async def start(self) -> None:
            asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(self.work()))

        async def work(self) -> None:
            if sys.argv[1] == "protected":  # (a pool's workers that ignore SIGTERM would hang its join)
                await asyncio.to_thread(pool_work)
            await asyncio.to_thread(fork_work)
            print("pool ended", flush=True)
            await asyncio.sleep(1.0)
            print("still running", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # now stop for real

        async def stop(self) -> None:
            print("stopped", flush=True)

    if sys.argv[1] == "raw":  # the hazard itself, without the service runtime's protection
        import flockwatch.common.forks as forks
        forks._installed = True  # (as if installed already: nothing is registered)
    bus = create_bus(CommonSettings(_env_file=None, bus_url="memory://"))
    asyncio.run(run_workers(bus, [Forker()]))
    """
)


def _run(mode: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", SERVICE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if line != "ready"]


def test_a_pool_ending_its_forked_workers_does_not_stop_the_service() -> None:
    assert _run("protected") == ["pool ended", "still running", "stopped"]


def test_without_the_protection_the_pool_stops_the_service() -> None:
    """The failure the protection prevents (so the test above can fail): stopped right after the pool."""
    lines = _run("raw")
    assert lines[-1] == "stopped" and "still running" not in lines
