"""The scheduler's policy, against a scripted engine double: round-robin at the step level, the
active cap and the bounded queue, cancellation freeing sequences, failures staying per request,
every engine call on the one worker thread, and the metrics hooks."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest

from specserve.server.engine.config import SamplingParams
from specserve.server.engine.errors import RequestError
from specserve.server.engine.events import NotReady, QueueFull
from specserve.server.engine.metrics import SpecMetrics
from specserve.server.engine.outputs import PromptInput, StepOutput
from specserve.server.engine.scheduler import Scheduler


@dataclass
class FakeSeq:
    name: str
    max_tokens: int
    output_ids: list = field(default_factory=list)
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    cached_tokens: int = 0
    prefix_len: int = 0  # tokens in the KV cache: > 0 once a step ran


class ScriptedEngine:
    """One token per step; prompt token 0 names the sequence. Records what ran, where."""

    def __init__(self, delay: float = 0.0, fail_step: str | None = None) -> None:
        self.delay, self.fail_step = delay, fail_step
        self.steps: list[str] = []  # sequence names in step order
        self.released: list[str] = []
        self.threads: set[int] = set()  # every thread that touched the engine

    def start(self, prompt: PromptInput, params: SamplingParams) -> FakeSeq:
        self.threads.add(threading.get_ident())
        if prompt.token_ids[0] == "bad":
            raise RequestError("no such prompt", "prompt")
        return FakeSeq(prompt.token_ids[0], params.max_tokens)

    def step(self, seq: FakeSeq) -> StepOutput:
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if seq.name == self.fail_step:
            raise RuntimeError("engine bug")
        self.steps.append(seq.name)
        seq.prefix_len += 1
        if seq.output_ids:  # every step after prefill verifies a draft of 2, accepting 1
            seq.metrics.observe(2, 1)
        seq.output_ids.append(len(seq.output_ids))
        done = len(seq.output_ids) >= seq.max_tokens
        return StepOutput([1], "x", None, done, "length" if done else None, [0], ["x"])

    def step_batch(self, seqs: list[FakeSeq]) -> list:
        outs = []
        for seq in seqs:
            try:
                outs.append(self.step(seq))
            except RuntimeError as exc:  # a real engine returns a sequence's own failure in its place
                outs.append(exc)
        return outs

    def release(self, seq: FakeSeq) -> None:
        self.threads.add(threading.get_ident())
        self.released.append(seq.name)


class Recorder:
    """A `SchedulerObserver` that keeps what it is told."""

    def __init__(self) -> None:
        self.deltas, self.records = [], []
        self.on_step, self.on_finish = self.deltas.append, self.records.append


def one(scheduler: Scheduler, name: str, max_tokens: int):
    """Submit a one-choice request whose prompt (token 0) names its sequence."""
    return scheduler.submit([PromptInput([name])], [SamplingParams(max_tokens=max_tokens)])


async def drain(group) -> list:
    """Every event of a request, up to its choices' last."""
    events = []
    while sum(e.finished for e in events) < group.size:
        events.append(await group.next_event())
    return events


async def hold_worker(scheduler: Scheduler) -> threading.Event:
    """Park the worker inside a call until the returned event is set, so that submissions made
    meanwhile are all waiting when it resumes (a deterministic start for ordering tests)."""
    release, parked = threading.Event(), threading.Event()

    def park(engine):
        parked.set()
        release.wait(10)

    asyncio.get_running_loop().create_task(scheduler.call(park))
    while not parked.is_set():
        await asyncio.sleep(0.001)
    return release


def make(engine, max_active=4, max_queue=8, observer=None) -> Scheduler:
    scheduler = Scheduler(engine, max_active=max_active, max_queue=max_queue, observer=observer)
    scheduler.start()
    return scheduler


def test_round_robin_interleaves_steps_and_short_request_finishes_first():
    engine = ScriptedEngine()
    scheduler = make(engine)

    async def main():
        release = await hold_worker(scheduler)
        long = one(scheduler, "L", 6)
        short = one(scheduler, "S", 2)
        release.set()
        await asyncio.gather(drain(long), drain(short))

    asyncio.run(main())
    scheduler.stop()
    assert engine.steps == ["L", "S", "L", "S", "L", "L", "L", "L"]
    assert sorted(engine.released) == ["L", "S"]


def test_active_cap_keeps_the_rest_waiting_in_fifo_order():
    engine = ScriptedEngine()
    scheduler = make(engine, max_active=1)
    seen_waiting = []

    async def main():
        release = await hold_worker(scheduler)
        groups = [one(scheduler, n, 2) for n in "ABC"]
        seen_waiting.append(scheduler.num_waiting)
        release.set()
        await asyncio.gather(*(drain(g) for g in groups))

    asyncio.run(main())
    scheduler.stop()
    assert seen_waiting == [3]
    assert engine.steps == ["A", "A", "B", "B", "C", "C"]
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0


def test_queue_full_refuses_new_requests():
    scheduler = make(ScriptedEngine(), max_active=1, max_queue=1)

    async def main():
        release = await hold_worker(scheduler)
        first = one(scheduler, "A", 1)
        second = one(scheduler, "B", 1)
        with pytest.raises(QueueFull):
            one(scheduler, "C", 1)
        release.set()
        await asyncio.gather(drain(first), drain(second))
        # room again once they are done
        await drain(one(scheduler, "D", 1))

    asyncio.run(main())
    scheduler.stop()


def test_cancel_releases_the_sequence_before_the_next_step():
    engine = ScriptedEngine(delay=0.01)
    recorder = Recorder()
    scheduler = make(engine, observer=recorder)

    async def main():
        group = one(scheduler, "A", 10_000)
        await group.next_event()
        await group.next_event()
        scheduler.cancel(group)
        deadline = time.monotonic() + 5
        while "A" not in engine.released and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    asyncio.run(main())
    steps_at_release = len(engine.steps)
    time.sleep(0.05)
    scheduler.stop()
    assert engine.released == ["A"]
    assert len(engine.steps) == steps_at_release  # no step after the release
    assert scheduler.num_running == 0
    assert [r.finish_reason for r in recorder.records] == ["abort"]


def test_engine_failure_fails_only_its_request():
    engine = ScriptedEngine(fail_step="B")
    scheduler = make(engine)

    async def main():
        good = one(scheduler, "A", 3)
        bad = one(scheduler, "B", 3)
        bad_events = await drain(bad)
        good_events = await drain(good)
        later = await drain(one(scheduler, "C", 2))
        return bad_events, good_events, later

    bad_events, good_events, later = asyncio.run(main())
    scheduler.stop()
    assert isinstance(bad_events[-1].error, RuntimeError)
    assert good_events[-1].finished and good_events[-1].error is None
    assert good_events[-1].num_output_tokens == 3
    assert later[-1].error is None  # the worker survived
    assert "B" in engine.released


def test_a_sequence_that_fails_before_its_first_chunk_reports_no_prefix_lookup():
    # prefix caching looks a prompt up just before its first prefill chunk: one that never got there
    # must not count as a query (with 0 hits) in the hit rate
    recorder = Recorder()
    scheduler = make(ScriptedEngine(fail_step="B"), observer=recorder)

    async def main():
        await drain(one(scheduler, "B", 3))
        await drain(one(scheduler, "A", 2))

    asyncio.run(main())
    scheduler.stop()
    records = {r.finish_reason: r for r in recorder.records}
    assert records["error"].cached_prompt_tokens is None
    assert records["length"].cached_prompt_tokens == 0


def test_start_rejection_is_an_error_event_and_siblings_are_dropped():
    engine = ScriptedEngine()
    scheduler = make(engine)

    async def main():
        group = scheduler.submit([PromptInput(["bad"]), PromptInput(["A"])], [SamplingParams(max_tokens=50)] * 2)
        return await group.next_event()

    event = asyncio.run(main())
    time.sleep(0.05)
    scheduler.stop()
    assert isinstance(event.error, RequestError) and event.error.param == "prompt"
    assert engine.steps.count("A") < 50  # the sibling choice was cancelled with its request


def test_all_engine_calls_run_on_one_worker_thread_and_calls_propagate_errors():
    engine = ScriptedEngine()
    scheduler = make(engine)

    def bad_template(engine):
        raise RequestError("bad template", "messages")

    async def main():
        worker = await scheduler.call(lambda eng: threading.get_ident())
        await drain(scheduler.submit([PromptInput(["A"]), PromptInput(["B"])], [SamplingParams(max_tokens=3)] * 2))
        with pytest.raises(RequestError):
            await scheduler.call(bad_template)
        return worker

    worker = asyncio.run(main())
    scheduler.stop()
    assert engine.threads == {worker}
    assert worker != threading.get_ident()


def test_factory_loads_on_the_worker_and_reports_failures():
    gate = threading.Event()

    def factory():
        gate.wait(10)
        return ScriptedEngine()

    loading = Scheduler(factory, max_active=1, max_queue=1)
    loading.start()
    with pytest.raises(NotReady, match="loading"):
        loading.check_ready()
    gate.set()
    deadline = time.monotonic() + 5
    while loading.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.005)
    loading.check_ready()
    loading.stop()

    def broken():
        raise FileNotFoundError("no weights")

    failed = Scheduler(broken, max_active=1, max_queue=1)
    failed.start()
    deadline = time.monotonic() + 5
    while failed.state != "failed" and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(NotReady, match="no weights"):
        failed.check_ready()


def test_observer_gets_step_deltas_and_finish_records():
    recorder = Recorder()
    scheduler = make(ScriptedEngine(), observer=recorder)

    async def main():
        return await drain(one(scheduler, "A", 4))

    events = asyncio.run(main())
    scheduler.stop()
    total = SpecMetrics()
    for delta in recorder.deltas:
        total.merge(delta)
    assert total.to_dict() == events[-1].metrics.to_dict()
    assert total.verify_steps == 3 and total.accepted_per_position == [3]
    (record,) = recorder.records
    assert record.finish_reason == "length" and record.output_tokens == 4
    assert record.cached_prompt_tokens == 0  # looked up, nothing found
    assert record.arrival <= record.first_token_time <= record.finish_time


def test_stop_fails_pending_requests():
    engine = ScriptedEngine(delay=0.02)
    scheduler = make(engine, max_active=1)

    async def main():
        group = one(scheduler, "A", 10_000)
        await group.next_event()
        await asyncio.to_thread(scheduler.stop)
        return (await drain(group))[-1]

    last = asyncio.run(main())
    assert isinstance(last.error, NotReady)
    assert engine.released == ["A"]
