"""A background thread that makes a loader's batches ahead of the training loop."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

PREFETCH_DEPTH = 2  # batches made ahead of the one in use


def prefetched(
    batches: Iterator[tuple[Tensor, Tensor]], device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """``batches``, made by a background thread up to ``PREFETCH_DEPTH`` batches ahead.

    While the training thread launches a step, the next batches are decoded (nvjpeg's CPU stage
    and the file bytes wait outside the GIL) and augmented. On CUDA the thread works on its own
    stream; each batch comes with an event the consumer's stream waits on, and the batch's
    tensors are marked as used by that stream so their memory is not reused early. Errors are
    raised in the consumer; leaving the loop early stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH_DEPTH)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    finished = object()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        # A new thread starts on GPU 0: work (and pin memory) on the loader's GPU instead.
        cuda = (torch.cuda.device(device), torch.cuda.stream(stream)) if stream is not None else ()
        try:
            with contextlib.ExitStack() as context:
                for manager in cuda:
                    context.enter_context(manager)
                for images, labels in batches:
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not hand_over((images, labels, event)):
                        return
        except BaseException as error:  # noqa: BLE001 (re-raised in the consumer)
            hand_over(error)
            return
        hand_over(finished)

    thread = threading.Thread(target=produce, name="sdd-search-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is finished:
                return
            if isinstance(item, BaseException):
                # Raised without keeping it in this frame: the exception's traceback holds this
                # frame, and that cycle would keep the loader (and its worker processes) alive
                # until a garbage collection, whose DataLoader shutdown waits 5 s per worker.
                error, item = item, None
                try:
                    raise error
                finally:
                    del error
            images, labels, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                images.record_stream(current)
                labels.record_stream(current)
            yield images, labels
    finally:
        stop.set()
        thread.join()
        batches.close()  # an epoch left early: end its loader iteration here, not at collection
