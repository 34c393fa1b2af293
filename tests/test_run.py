"""The README's first command, for real: shell/run serves both default models on
vLLM's CPU build, and Ctrl-C leaves no process behind. Minutes, like the other
end-to-end test."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest

from harness.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
ROOT = Path(__file__).parents[1]


def stack_processes(marker: str) -> list[str]:
    """Processes whose environment carries `marker` (every process the stack started)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(f"{pid} {cmdline.decode(errors='replace')[:120]}")
    return found


def descendants(pids: list[int]) -> set[int]:
    """`pids` and every process below them."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(pids)
    while True:
        more = {child for child, up in parent.items() if up in found} - found
        if not more:
            return found
        found |= more


def test_shell_run_serves_the_default_models_and_stops_clean(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    router_port, redis_port = free_port(), free_port()
    env = {
        **os.environ,
        "NEBULA_STATE_DIR": str(state_dir),
        "NEBULA_ROUTER_PORT": str(router_port),
        "NEBULA_REDIS_PORT": str(redis_port),
    }
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        # Its own session, as a terminal would give it: Ctrl-C reaches its whole group.
        # And SIGINT at its default, as in a terminal (a background CI job may ignore it,
        # and an ignored signal cannot be trapped).
        run = subprocess.Popen(
            [str(ROOT / "shell" / "run")], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 1200
        while "\nREADY\n" not in log.read_text(errors="replace"):
            assert run.poll() is None, f"shell/run exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        text = log.read_text()
        assert f"http://127.0.0.1:{router_port}/v1/chat/completions" in text  # how to use it
        assert "nebula-cli cluster status" in text and "nebula-shell" in text

        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{router_port}/v1", api_key="unused", timeout=120
        ) as client:
            answer = client.chat.completions.create(
                model="smollm2_135m_chat",
                messages=[{"role": "user", "content": "Name a colour."}],
                max_tokens=16,
            )
            assert (answer.choices[0].message.content or "").strip()
            vector = client.embeddings.create(model="minilm_l6_embedding", input="hello")
            assert len(vector.data[0].embedding) == 384
        assert stack_processes(str(state_dir)), "no stack processes while it was serving"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        code = run.wait(180)
    assert code in (0, 130), f"shell/run exited {code}:\n{log.read_text()[-3000:]}"
    deadline = time.monotonic() + 30
    while stack_processes(str(state_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack_processes(str(state_dir)) == []


def test_shell_run_stops_the_stack_when_its_output_pipe_is_gone(tmp_path: Path) -> None:
    """`shell/run | tee run.log`, then Ctrl-C: tee dies with the shell's group, and
    shell/run's own goodbye is a write to a closed pipe. It must stop the stack anyway."""
    state_dir = tmp_path / "stack"
    redis_port = free_port()
    env = {
        **os.environ,
        "NEBULA_STATE_DIR": str(state_dir),
        "NEBULA_ROUTER_PORT": str(free_port()),
        "NEBULA_REDIS_PORT": str(redis_port),
    }
    run = subprocess.Popen(
        [str(ROOT / "shell" / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert run.stdout is not None
    seen = b""
    try:
        deadline = time.monotonic() + 600
        while b"waiting for the models" not in seen:  # the stack is up, models loading
            assert time.monotonic() < deadline, f"the stack never started:\n{seen[-3000:]!r}"
            ready, _, _ = select.select([run.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(run.stdout.fileno(), 65536)
                assert chunk, f"shell/run ended early:\n{seen[-3000:]!r}"
                seen += chunk
        assert stack_processes(str(state_dir)), "no stack processes while it was starting"
        run.stdout.close()  # the reader is gone
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        run.wait(180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    deadline = time.monotonic() + 90
    while stack_processes(str(state_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = stack_processes(str(state_dir))
    # Clean up what a shell/run that failed here left: every process and its children
    # (vLLM's engine cores rename themselves, and Redis rewrites its environment, so
    # the marker misses them), by PID.
    redis = subprocess.run(["pgrep", "-f", f"redis-server 127.0.0.1:{redis_port}"],
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    for pid in descendants([int(line.split()[0]) for line in left] + [int(p) for p in redis]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"the stack outlived shell/run: {left}"
