"""The worker threads: run sendmail for claimed jobs, never touch the database.

Purpose: up to ``maxchildren`` threads each take a Job, run sendmail for it batch by
batch (``maxrcptbatch`` recipients per run) and put a Verdict on the results queue.
A batch sendmail accepted while more remain is reported as SENT and the worker waits
for the main thread to commit it (``job.ack``) before the next batch, so a crash
re-sends at most the batch in flight.

Security: a message whose body no longer matches the checksum stored at intake
(damage in the queue database) is not sent: it goes bad with the reason, instead of
handing sendmail whatever bytes the damaged pages now hold. Addresses are checked
before they become argv (command.py).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading

from smapq.deliver import child, command, policy
from smapq.deliver.inbox import Inbox
from smapq.deliver.jobs import RELEASE, SENT, Job, Verdict

DAMAGED_BODY = "body damaged in the queue database (sha256 mismatch): not sent"


class Workers:
    """A pool of threads fed through ``jobs``; verdicts go to ``results``."""

    def __init__(self, results: Inbox[tuple[Job, Verdict]], log: logging.Logger):
        self.results = results
        self.log = log
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def submit(self, job: Job, wanted: int) -> None:
        """Queue ``job``; start threads until ``wanted`` run (maxchildren, or fewer jobs)."""
        while len(self.threads) < wanted:
            thread = threading.Thread(
                target=self._run, name=f"smapd-worker-{len(self.threads)}", daemon=True
            )
            thread.start()
            self.threads.append(thread)
        self.jobs.put(job)

    def unstarted(self) -> list[Job]:
        """Take back every job no worker has picked up yet."""
        out: list[Job] = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return out
            if job is not None:
                out.append(job)

    def stop(self) -> None:
        """Tell every thread to end once its current job is done."""
        for _ in self.threads:
            self.jobs.put(None)

    def alive(self) -> list[threading.Thread]:
        return [t for t in self.threads if t.is_alive()]

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                verdict = deliver(job, self.results)
            except Exception as exc:
                # A bug: defer (the attempt counts, so a message that always crashes
                # still ages out), rather than leave the row to lease expiry.
                self.log.exception("%s: delivery crashed", job.queue_id)
                verdict = Verdict(policy.RETRY, f"delivery crashed: {exc!r}")
            self.results.put((job, verdict))


def deliver(job: Job, results: Inbox[tuple[Job, Verdict]]) -> Verdict:
    """Run sendmail for every unsent recipient of ``job``; the final verdict."""
    s = job.settings
    addresses = [a for _, a in job.rcpts]
    try:
        sender = command.sender_arg(job.mail_from)
        command.check_recipients(addresses)
    except command.Refused as exc:
        return Verdict(policy.BAD, f"refused: {exc}", rcpt_ids=[i for i, _ in job.rcpts])
    if not job.rcpts:
        # Every batch was accepted before a crash cut the last outcome short.
        return Verdict(policy.DELIVERED, "all recipients were already sent", 0)
    if job.data is None:
        return Verdict(policy.BAD, "message body missing from the queue")
    if not _intact(job):
        return Verdict(policy.BAD, DAMAGED_BODY, rcpt_ids=[i for i, _ in job.rcpts])
    spans = list(command.batches(job.rcpts, s.maxrcptbatch))
    for n, span in enumerate(spans):
        batch = [job.rcpts[i] for i in span]
        argv = command.argv(s.sendmail, sender, [a for _, a in batch])
        result = child.run(argv, job.data, s.sendmailtimeout, s.outputmax, job.abort, job.started)
        if result.exec_error is not None:
            # Said plainly ("does not exist", "is not executable") where it can be;
            # checked only on failure, not with three stat calls per message.
            result.exec_error = policy.exec_problem(s.sendmail) or result.exec_error
        kind = policy.classify(result, s.retrycodes)
        text = result.describe()
        ids = [i for i, _ in batch]
        if kind == policy.DELIVERED and n + 1 < len(spans):
            job.ack.clear()
            results.put((job, Verdict(SENT, text, 0, ids)))
            job.ack.wait()
            if not job.ack_ok:
                # Fenced off when recorded; the rest waits for whoever holds it now.
                return Verdict(policy.RETRY, "lease lost between batches")
            continue
        if kind != policy.DELIVERED and job.abort.is_set():
            return Verdict(RELEASE, f"released at shutdown: {text}")
        rest = [i for i, _ in job.rcpts[span.start :]]
        return Verdict(kind, text, result.status, ids if kind == policy.DELIVERED else rest)
    raise AssertionError("unreachable: a message with recipients has a batch")


def _intact(job: Job) -> bool:
    """Does the stored body still hash to what intake stored beside it?"""
    if not job.body_sha256 or job.data is None:
        return True  # nothing to compare with
    body = memoryview(job.data)[job.trace_len :]
    return hashlib.sha256(body).hexdigest() == job.body_sha256
