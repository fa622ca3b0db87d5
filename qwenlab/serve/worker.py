"""The engine's step loop in one background thread, and the asyncio side that talks to it.

The event loop never touches the engine: it puts commands (add, abort) on a thread-safe queue; the
engine thread runs them between steps, steps while anything is unfinished, and hands each step's
outputs back with ``loop.call_soon_threadsafe`` to the request's own ``asyncio.Queue``. Plain Python
objects cross the thread boundary; nothing is pickled.

An exception inside ``engine.step()`` (a bug, or the test hook) fails the requests in flight with an
error item and aborts them; the loop goes on with the next request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..engine import RequestOutput, SamplingParams
from .logits import LogitsHook

logger = logging.getLogger("qwenlab.serve")


@dataclass
class EngineFailure:
    """Sent to a request's sink when the engine step failed while it was in flight."""

    message: str


class EngineLoop:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.hook = LogitsHook.install(engine)
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, tuple[asyncio.Queue, object]] = {}  # request id -> (sink, tag); engine thread only
        self.stats: dict = engine.stats()  # replaced (never mutated) by the engine thread after each step
        self.stats_time = time.monotonic()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qwenlab-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self.commands.put(("stop",))
        self._thread.join(timeout)

    # ---- the asyncio side ----------------------------------------------------------------------------
    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: asyncio.Queue,
                  tag=None, logit_bias: dict[int, float] | None = None, forced=None) -> None:
        """Queue a request whose outputs go to ``sink`` as ``(tag, RequestOutput | EngineFailure)``.

        Raises the engine's RequestError (or any error) if the engine refuses it.
        """
        done = self.loop.create_future()
        self.commands.put(("add", request_id, prompt_token_ids, params, logit_bias, forced, (sink, tag), done))
        await done

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    # ---- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            busy = self.engine.has_unfinished_requests()
            self._drain(block=not busy)
            if self._stop:
                break
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - the server must survive a failed step
                    logger.exception("engine step failed")
                    self._fail_all(f"internal error in the engine: {type(exc).__name__}: {exc}")
                else:
                    self._deliver(outputs)
            self.stats = self.engine.stats()
            self.stats_time = time.monotonic()

    def _drain(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._execute(command)
            except Exception:  # noqa: BLE001 - the loop must outlive any one command
                logger.exception("engine command %s failed", command[0])
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, ids, params, logit_bias, force, stream, done = command
            try:
                self.hook.register(request_id, logit_bias, force)
                self.engine.add_request(request_id, ids, params)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting handler
                self.hook.forget(request_id)
                self._resolve(done, exc)
            else:
                self.streams[request_id] = stream
                self._resolve(done, None)
        elif kind == "abort":
            request_id = command[1]
            self.engine.abort(request_id)
            self.hook.forget(request_id)
            self.streams.pop(request_id, None)

    def _resolve(self, future: asyncio.Future, exc: BaseException | None) -> None:
        def settle():
            if future.done():
                return
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(settle)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        items = []
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            items.append((stream, out))
            if out.finished:
                del self.streams[out.request_id]
                self.hook.forget(out.request_id)
        if items:
            self.loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, message: str) -> None:
        items = []
        for request_id, stream in list(self.streams.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                logger.exception("abort after a failed step failed")
            self.hook.forget(request_id)
            items.append((stream, EngineFailure(message)))
        self.streams.clear()
        if items:
            self.loop.call_soon_threadsafe(_put_all, items)


def _put_all(items) -> None:
    for (sink, tag), item in items:
        sink.put_nowait((tag, item))
