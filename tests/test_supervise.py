"""dpbp/service/supervise.py in one process: StopSignals, StopVote and the Watchdog."""

import os
import signal
import threading
import time

import pytest

from dpbp.errors import Stopped
from dpbp.parallel.comm import Comm
from dpbp.service.supervise import StopSignals, StopVote, Watchdog


def wait_for(condition, seconds=10.0):
    """Poll until condition() holds (a signal handler runs between bytecodes)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_sigterm_becomes_a_request_and_the_next_one_would_act_at_once():
    """Once deferred (training under way), one SIGTERM only sets `received`."""
    assert threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as signals:
        signals.defer()
        assert signals.received == 0
        assert all(signal.getsignal(s) != before[s] for s in StopSignals.SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)   # the process lives on
        assert wait_for(lambda: signals.received)
        assert signals.received == signal.SIGTERM
        # the previous handler is back for SIGTERM at once (a second one is not caught),
        # while SIGINT is still caught
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


def test_a_sigterm_during_set_up_stops_at_once():
    """Before defer(), nothing is trained yet: the signal raises Stopped where it lands."""
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with pytest.raises(Stopped) as stop:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for(lambda: False, seconds=10)   # the handler raises in here
    assert stop.value.signum == signal.SIGTERM and signals.received == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


def test_outside_the_main_thread_nothing_is_installed():
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    seen = []

    def enter():
        with StopSignals():
            seen.append({s: signal.getsignal(s) for s in StopSignals.SIGNALS})

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(10)
    assert seen == [before]
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


def test_the_vote_returns_a_signal_one_poll_behind():
    """poll() returns what had been received by the previous poll: a signal that comes
    after poll 2 is returned by poll 4, not 3, and from then on."""
    signals = StopSignals()   # not entered: `received` is set by hand
    with StopVote(Comm(None), signals) as vote:
        assert [vote.poll(), vote.poll()] == [0, 0]
        signals.received = signal.SIGTERM
        assert vote.poll() == 0   # its ballot was cast at poll 2, before the signal
        assert vote.poll() == signal.SIGTERM
        assert vote.poll() == signal.SIGTERM


def test_an_unfed_watchdog_calls_back_with_a_stack(capfd):
    fired = threading.Event()
    start = time.monotonic()
    dog = Watchdog(seconds=0.3, rank=0, on_timeout=fired.set)
    assert fired.wait(10), "the watchdog never fired"
    assert time.monotonic() - start >= 0.3   # never before its deadline
    dog.stop()
    err = capfd.readouterr().err
    assert "dpbp: rank 0: " in err and " in 0.3 s (run.watchdog_seconds)" in err
    assert "test_an_unfed_watchdog_calls_back_with_a_stack" in err   # this thread's stack


def test_a_fed_watchdog_stays_quiet():
    """Fed every 0.05 s for three times its limit of 1 s: quiet unless the machine stalls
    this test for a whole second between two feeds."""
    fired = threading.Event()
    dog = Watchdog(seconds=1.0, rank=1, on_timeout=fired.set)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        dog.feed()
        time.sleep(0.05)
    dog.stop()
    time.sleep(0.5)   # past the thread's next check, which now ends it
    assert not fired.is_set()


def test_a_watchdog_of_zero_seconds_starts_no_thread():
    before = set(threading.enumerate())
    dog = Watchdog(0, rank=0, on_timeout=lambda: pytest.fail("called"))
    started = set(threading.enumerate()) - before
    assert not [t for t in started if t.name == "dpbp-watchdog"]
    dog.feed()
    dog.stop()
