"""The micro-batcher: one thread owns the diffusion pipeline and runs every forward pass for its worker.

Why: a diffusers pipeline is not re-entrant (the scheduler keeps per-call state in `set_timesteps`), and a
UNet pass over 64 images costs much less than four passes over 16. So requests do not call the pipeline;
they submit their n candidates here and wait on a future:

    batcher = DiffusionBatcher(pipe, max_batch_images=64, wait_ms=5)
    images = batcher.submit(prompt, seeds, steps=20, guidance=7.5).result()   # [n, 3, H, W] float32 in [0, 1], CPU

Each pass takes candidates in arrival order from requests with the same (steps, guidance, adapter) (a pass
runs one denoising schedule with one guidance scale and one set of UNet weights), up to `max_batch_images`; a
request with more candidates than that is split over passes.

Adapters: the pass key names the LoRA adapter version ("base" = none) and `activate(adapter)` is called on this
thread right before the pipeline call, so a pass is drawn by exactly the weights its requests were routed to.
Anything that changes the pipeline's weights (loading, hot-swapping, evicting an adapter) is handed to this
thread with `call(fn)` and runs between passes: peft's hot-swap copies weights layer by layer, so it must
never overlap a forward pass, and loading makes the new adapter the active one. Prompts may differ within a pass: the pipeline takes one prompt per image.
Every candidate has its own CPU torch.Generator seeded with its own seed (alignloop.generation.generate, the path
world eval and the trainers use too), so its starting noise, and with
DDIM (eta = 0) its image, do not depend on which other images share the pass. (Floating-point results of a
batched convolution can differ in the last bits between batch sizes; images agree to well within one
8-bit level.) CPU generators also make a seed give the same noise on CPU and CUDA.

With `cross_request=False` a pass holds candidates of one request only: the baseline the benchmark
compares against.

The queue is bounded: `submit` raises `QueueFull` (503 with Retry-After) when the candidates already waiting plus
the new request's would exceed `max_queued_images`, so overload is answered at once instead of with ever longer
waits and an ever larger queue. A request that finds the queue empty is always taken.
"""

import collections
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from alignloop.generation import generate


@dataclass(eq=False)
class _Job:
    prompt: str
    seeds: list[int]
    steps: int
    guidance: float
    future: Future
    submitted_at: float
    adapter: str = "base"  # LoRA adapter version that draws it; "base" = none
    images: list = field(default_factory=list)  # per candidate: tensor [3, H, W] once sampled
    taken: int = 0  # candidates handed to passes so far
    done: int = 0  # candidates sampled so far
    started_at: Optional[float] = None  # when its first pass began
    sampling_s: float = 0.0  # wall time of the passes that held its candidates

    @property
    def key(self) -> tuple:
        return (self.steps, self.guidance, self.adapter)


class QueueFull(Exception):
    """The batcher's queue is full; `retry_after_s`: when it will likely have room (whole seconds, >= 1)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SampledImages:
    images: torch.Tensor  # [n, 3, H, W] float32 in [0, 1], CPU
    queue_s: float  # submit -> first pass started
    sampling_s: float  # sum of the wall times of the passes that held this request's candidates


class DiffusionBatcher:
    def __init__(self, pipeline, max_batch_images: int = 64, wait_ms: float = 5.0, cross_request: bool = True,
                 on_pass: Optional[Callable[[int, int, float], None]] = None,
                 activate: Optional[Callable[[str], None]] = None, max_queued_images: Optional[int] = None):
        """`on_pass(images, requests, seconds)` is called after each pass (metrics); `activate(adapter)` before each
        pass, on this thread (serving.adapter_slots.AdapterSlots.activate); `max_queued_images`: the queue's bound
        (None = unbounded, for in-process benchmarks and tests)."""
        if max_batch_images < 1:
            raise ValueError(f"max_batch_images must be >= 1, got {max_batch_images}")
        self.pipeline = pipeline
        self.max_batch_images = max_batch_images
        self.max_queued_images = max_queued_images
        self._pass_s = 1.0  # recent seconds per pass (moving average), for Retry-After
        self.wait_s = max(0.0, wait_ms) / 1000
        self.cross_request = cross_request
        self._on_pass = on_pass
        self.activate = activate
        self._calls: collections.deque = collections.deque()  # (fn, future): run between passes
        self._queue: collections.deque[_Job] = collections.deque()  # jobs with candidates not yet taken
        self._cond = threading.Condition()
        self._closing = False
        self.passes = 0  # forward passes run (for tests and the benchmark)
        self._in_pass: set = set()  # adapters of the pass running now
        self._thread = threading.Thread(target=self._run, name="alignloop-diffusion-batcher", daemon=True)
        self._thread.start()

    # -- the requests' side ---------------------------------------------------------------------------------

    def submit(self, prompt: str, seeds: list[int], steps: int, guidance: float,
               adapter: str = "base") -> "Future[SampledImages]":
        if not seeds:
            raise ValueError("seeds must hold one seed per candidate (at least one)")
        if adapter != "base" and self.activate is None:
            raise ValueError(f"adapter {adapter!r} asked of a batcher that serves the base model only")
        job = _Job(prompt, list(seeds), int(steps), float(guidance), Future(), time.monotonic(), adapter)
        job.images = [None] * len(seeds)
        with self._cond:
            if self._closing:
                raise RuntimeError("the batcher is closed")
            waiting = sum(len(j.seeds) - j.taken for j in self._queue)
            if self.max_queued_images is not None and waiting and waiting + len(seeds) > self.max_queued_images:
                passes = math.ceil(waiting / self.max_batch_images)
                raise QueueFull(f"the server is at capacity ({waiting} images queued, at most "
                                f"{self.max_queued_images}); retry later", max(1, math.ceil(passes * self._pass_s)))
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the batcher thread between two passes (before any pass not yet started); its result or
        exception lands in the returned future. For everything that changes the pipeline's weights."""
        future = Future()
        with self._cond:
            if self._closing:
                raise RuntimeError("the batcher is closed")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def pending_adapters(self) -> set:
        """Adapters of requests queued or in a pass now (call from the batcher thread, e.g. inside `call`)."""
        with self._cond:
            return {job.adapter for job in self._queue} | self._in_pass

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued work, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the batcher thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._calls and not self._closing:
                    self._cond.wait()
                if self._calls:
                    call = self._calls.popleft()
                    slots = None
                elif not self._queue:
                    return  # closing and drained
                else:
                    # Group simultaneous arrivals: if the pass would not be full, give others a moment to join.
                    if self.wait_s and self.cross_request and self._waiting_images() < self.max_batch_images:
                        self._cond.wait(self.wait_s)
                    slots = self._take()
                    self._in_pass = {job.adapter for job, _, _ in slots}
            if slots is None:
                self._run_call(*call)
            else:
                self._run_pass(slots)
                with self._cond:
                    self._in_pass = set()

    @staticmethod
    def _run_call(fn, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            future.set_exception(err)

    def _waiting_images(self) -> int:
        key = self._queue[0].key
        return sum(len(j.seeds) - j.taken for j in self._queue if j.key == key)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """(job, first, stop) slices for the next pass: FIFO among jobs sharing the oldest job's key."""
        head = self._queue[0]
        room = self.max_batch_images
        slots = []
        for job in self._queue:
            if job.key != head.key:
                continue
            if job is not head and not self.cross_request:
                break
            count = min(room, len(job.seeds) - job.taken)
            slots.append((job, job.taken, job.taken + count))
            job.taken += count
            room -= count
            if room == 0:
                break
        for job, _, _ in slots:
            if job.taken == len(job.seeds):
                self._queue.remove(job)
        return slots

    def _run_pass(self, slots: list[tuple[_Job, int, int]]) -> None:
        slots = [s for s in slots if not s[0].future.done()]  # a job that already failed
        if not slots:
            return
        # 1. One prompt and one seed per candidate
        prompts, seeds = [], []
        for job, first, stop in slots:
            prompts += [job.prompt] * (stop - first)
            seeds += job.seeds[first:stop]
        steps, guidance, adapter = slots[0][0].key
        started = time.monotonic()
        for job, _, _ in slots:
            if job.started_at is None:
                job.started_at = started
        # 2. The pass's adapter, then denoise and decode
        try:
            if self.activate is not None:
                self.activate(adapter)
            images = generate(self.pipeline, prompts, seeds, steps, guidance)  # [B, 3, H, W] in [0, 1], CPU
        except Exception as err:  # fail the requests of this pass, keep serving the others
            for job, _, _ in slots:
                if not job.future.done():
                    job.future.set_exception(err)
            with self._cond:
                for job, _, _ in slots:
                    if job in self._queue:
                        self._queue.remove(job)
            return
        elapsed = time.monotonic() - started
        self.passes += 1
        self._pass_s = 0.8 * self._pass_s + 0.2 * elapsed
        if self._on_pass:
            self._on_pass(len(prompts), len(slots), elapsed, adapter)
        # 3. Hand each request its images; complete the requests that have all of theirs
        offset = 0
        for job, first, stop in slots:
            for i in range(first, stop):
                job.images[i] = images[offset]
                offset += 1
            job.done += stop - first
            job.sampling_s += elapsed
            if job.done == len(job.seeds):
                job.future.set_result(SampledImages(torch.stack(job.images), job.started_at - job.submitted_at,
                                                    job.sampling_s))
