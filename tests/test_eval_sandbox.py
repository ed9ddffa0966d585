"""HumanEval execution: bad completions are stopped, counted failed, and the run goes on."""

import socket
import threading

from tide_ds.eval.humaneval import execute, truncate
from tide_ds.eval.sandbox import Limits, run_program

PROBLEM = {
    "task_id": "t/0",
    "prompt": "def add(a, b):\n",
    "entry_point": "add",
    "test": "def check(f):\n    assert f(2, 3) == 5\n",
}
LIMITS = Limits(cpu_s=2, memory_mb=256, wall_s=6.0)


def test_good_and_wrong_programs():
    assert run_program("x = 1\n", LIMITS).passed
    assert run_program("raise SystemExit(3)\n", LIMITS).reason == "failed"


def test_bad_completions_fail_and_the_run_continues():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        for _ in range(40):
            try:
                accepted.append(server.accept())
            except (TimeoutError, OSError):
                pass

    watcher = threading.Thread(target=accept)
    watcher.start()
    completions = [
        "    return a + b\n",  # passes
        "    while True:\n        pass\n",  # loops forever: stopped by the CPU limit
        "    x = []\n    while True:\n        x.append(' ' * 10_000_000)\n",  # unbounded allocation
        f"    import socket\n    s = socket.create_connection(('127.0.0.1', {port}))\n    s.sendall(b'hi')\n"
        "    return a + b\n",  # network
        f"    import _socket\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n    return a + b\n",
        "    return a + b\n",  # still evaluated after all that
    ]
    result = execute([PROBLEM] * len(completions), completions, limits=LIMITS, workers=2)
    watcher.join()
    server.close()
    assert result["passed"] == 2 and result["problems"] == 6
    assert not accepted, "a sandboxed program reached a socket"
    assert result["pass@1"] == 2 / 6


def test_wall_clock_limit_stops_a_sleeping_program():
    out = run_program("import time\ntime.sleep(60)\n", Limits(cpu_s=5, memory_mb=256, wall_s=1.0))
    assert not out.passed and out.reason == "timeout"


def test_truncate_stops_at_the_next_top_level_statement():
    assert truncate("    return 1\n\ndef other():\n    pass\n") == "    return 1\n"
    assert truncate("    return 1\n") == "    return 1\n"
