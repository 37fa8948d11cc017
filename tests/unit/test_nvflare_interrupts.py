"""Ctrl-C while FLARE runs is never lost, even when library code catches it between two polls."""

from __future__ import annotations

import _thread
import signal
import time

import pytest

from fedumm.engines.nvflare.runner import _latched_interrupts


def test_a_swallowed_ctrl_c_is_raised_again_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _latched_interrupts() as latch:
        latch.check()  # nothing pressed yet
        try:
            _thread.interrupt_main()  # delivered at the main thread's next bytecode
            time.sleep(0.5)
        except KeyboardInterrupt:
            pass  # what a library's broad except clause would do
        with pytest.raises(KeyboardInterrupt):
            latch.check()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
