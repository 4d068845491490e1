"""A worker's followers of the registry (reward model, rollout) poll it: no state may live only in one worker."""

import threading


def transient(err: BaseException) -> bool:
    """A failure to try again at the next poll, not to refuse a version for until its manifest changes: the store
    or the network failing (OSError: s3fs and local files raise it) or no memory just now (a CUDA OOM while another
    adapter is still resident)."""
    import torch

    return isinstance(err, (OSError, MemoryError, torch.cuda.OutOfMemoryError))


class Poller:
    """Calls `reconcile()` once at `start()`, then every `poll_s` seconds on a daemon thread until `close()`.
    Subclasses set `poll_s` and define `reconcile()` (which must not raise: the next poll tries again)."""

    poll_s: float
    thread_name = "registry-poller"

    def start(self):
        self._stop = threading.Event()
        self.reconcile()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.reconcile()

    def close(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join(timeout=10)
