"""One thread for all of a process's torch work, handed calls one after another.

OpenMP keeps a team of worker threads per thread that starts parallel work, and a team
serves its own thread best: on the 2-core development CPU, `fgpt serve`'s decode loop ran
the `gpt2` config at 27 tok/s on its own thread after the main thread had loaded and
checked the weights, and at 37 tok/s when that thread had loaded them itself. So the server
loads, quantizes and decodes on one `ComputeThread`, and its HTTP thread never computes.
"""

import queue
import threading
from concurrent.futures import Future
from typing import Callable


class ComputeThread(threading.Thread):
    """A daemon thread running the calls it is given, in order, until `stop`."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self._calls: queue.Queue = queue.Queue()

    def run(self) -> None:
        while True:
            call, future = self._calls.get()
            if call is None:
                return
            try:
                future.set_result(call())
            except BaseException as e:  # the caller of `call` raises it
                future.set_exception(e)

    def submit(self, call: Callable) -> Future:
        """Queue call() -> a Future of its result (or its exception)."""
        future: Future = Future()
        self._calls.put((call, future))
        return future

    def call(self, call: Callable):
        """Run call() on this thread and wait: its result, or its exception raised here."""
        return self.submit(call).result()

    def stop(self, timeout: float | None = None) -> None:
        """End the thread once the calls queued before have run, and wait up to `timeout` s."""
        self._calls.put((None, None))
        self.join(timeout)
