"""Pure parts of the deliverer: exit-code policy, backoff, argv building."""

from __future__ import annotations

import signal

import pytest

from smapq.deliver import command, policy
from smapq.deliver.policy import BAD, DELIVERED, RETRY, ChildResult

DEFAULT_RETRY = frozenset({71, 74, 75})

# Every sysexits code and then some: the default mapping (Postfix's, plus 74).
MATRIX = [(0, DELIVERED), (1, BAD), (2, BAD), (255, BAD)] + [
    (code, RETRY if code in (71, 74, 75) else BAD) for code in range(64, 79)
]


@pytest.mark.parametrize(("status", "expected"), MATRIX)
def test_exit_status_maps_to_outcome(status: int, expected: str) -> None:
    assert policy.classify(ChildResult(status=status), DEFAULT_RETRY) == expected


def test_retry_codes_are_configurable() -> None:
    codes = frozenset({67, 69})
    assert policy.classify(ChildResult(status=67), codes) == RETRY
    assert policy.classify(ChildResult(status=75), codes) == BAD


@pytest.mark.parametrize(
    "result",
    [
        ChildResult(signal=signal.SIGKILL),
        ChildResult(signal=signal.SIGSEGV),
        ChildResult(timed_out=True),
        ChildResult(exec_error="cannot execute /nope: No such file or directory"),
    ],
)
def test_signals_timeouts_and_exec_failures_are_retried(result: ChildResult) -> None:
    assert policy.classify(result, frozenset()) == RETRY


def test_describe_names_the_sysexit_and_flattens_output() -> None:
    text = ChildResult(status=75, output=b"line one\n\nline two\n").describe()
    assert text == "exit 75 (EX_TEMPFAIL): line one | line two"
    assert ChildResult(signal=9).describe() == "killed by signal SIGKILL"
    assert ChildResult(timed_out=True).describe() == "timed out, killed"


def test_backoff_doubles_from_min_to_max() -> None:
    delays = [policy.backoff(n, 300, 3600) for n in range(1, 8)]
    assert delays == [300, 600, 1200, 2400, 3600, 3600, 3600]


def test_backoff_survives_huge_attempt_counts() -> None:
    assert policy.backoff(10_000, 300, 3600) == 3600


def test_next_attempt_gives_up_at_the_deadline_and_tries_once_there() -> None:
    day = 86400.0
    # Plenty of time left: the normal backoff.
    assert policy.next_attempt(1000.0, 0.0, 1, 300, 3600, 5 * 86400) == 1300.0
    # Close to the deadline: the last try is at the deadline itself, not after it.
    assert policy.next_attempt(5 * day - 10, 0.0, 9, 300, 3600, 5 * 86400) == 5 * day
    # At or past the deadline: give up.
    assert policy.next_attempt(5 * day, 0.0, 10, 300, 3600, 5 * 86400) is None


def test_time_on_hold_does_not_count_towards_the_deadline() -> None:
    day = 86400.0
    life = 5 * 86400
    # Received at 0, held for 3 days: at day 6 it still has a day left.
    assert policy.next_attempt(6 * day, 0.0, 1, 300, 3600, life) is None
    assert policy.next_attempt(6 * day, 0.0, 1, 300, 3600, life, held=3 * day) == 6 * day + 300
    assert policy.next_attempt(8 * day - 10, 0.0, 9, 300, 3600, life, 3 * day) == 8 * day
    assert policy.next_attempt(8 * day, 0.0, 9, 300, 3600, life, held=3 * day) is None
    # The hold is only looked up when the deadline is in reach of the next backoff.
    assert not policy.near_deadline(day, 0.0, 1, 300, 3600, life)
    assert policy.near_deadline(5 * day - 100, 0.0, 1, 300, 3600, life)


def test_argv_is_sendmail_oi_f_sender_dashdash_recipients() -> None:
    argv = command.argv("/usr/sbin/sendmail", "a@b", ["c@d", "e@f"])
    assert argv == ["/usr/sbin/sendmail", "-oi", "-f", "a@b", "--", "c@d", "e@f"]


@pytest.mark.parametrize("stored", ["", "<>", " <> "])
def test_null_sender_becomes_angle_brackets(stored: str) -> None:
    assert command.sender_arg(stored) == "<>"


def test_bracketed_sender_is_unwrapped() -> None:
    assert command.sender_arg("<a@b.example>") == "a@b.example"


@pytest.mark.parametrize("bad", ["-oQ/tmp", "<-oQ/tmp>", "-f", "a\nb@c", "a\x00b"])
def test_dangerous_senders_are_refused(bad: str) -> None:
    with pytest.raises(command.Refused):
        command.sender_arg(bad)


@pytest.mark.parametrize("bad", ["-oQ/tmp", "-", "", "x\ry@z", "a\x7f@b"])
def test_dangerous_recipients_are_refused(bad: str) -> None:
    with pytest.raises(command.Refused):
        command.argv("/usr/sbin/sendmail", "a@b", ["ok@x", bad])


def test_batches_cover_every_recipient_in_order() -> None:
    items = list(range(7))
    spans = list(command.batches(items, 3))
    assert [list(s) for s in spans] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(command.batches([], 3)) == []


def test_exec_problem_reports_missing_and_non_executable(tmp_path: object) -> None:
    assert "does not exist" in (policy.exec_problem("/nonexistent/sendmail") or "")
    assert "not executable" in (policy.exec_problem("/etc/passwd") or "")
    assert "not executable" in (policy.exec_problem("/") or "")
    assert policy.exec_problem("/bin/sh") is None
