"""`longctx serve` as a user runs it: its own embedded Ray beside the session's (two instances on
one node), the URL printed, requests served, a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

LONGCTX = Path(sys.executable).parent / "longctx"


def _serve(model_dir: str, port: int) -> subprocess.Popen:
    command = [str(LONGCTX), "serve", "--model", model_dir, "--port", str(port), "--block-size", "16", "--num-kv-blocks", "64"]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment)


def _wait_for_line(process: subprocess.Popen, needle: str, timeout_s: float, seen: list[str] | None = None) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if seen is not None:
            seen.append(line)
        if needle in line:
            return line
        if not line and process.poll() is not None:
            raise AssertionError(f"longctx serve exited with {process.returncode} before printing {needle!r}")
    raise AssertionError(f"no {needle!r} within {timeout_s} s")


def test_longctx_serve_runs_in_the_foreground_and_stops_on_sigterm(model_dir, served):
    port = _free_port()
    process = _serve(model_dir, port)
    try:
        summary: list[str] = []
        line = _wait_for_line(process, "serving", timeout_s=90, seen=summary)
        assert f"http://127.0.0.1:{port}/v1" in line
        # The start-up summary: model, dtype, layout, KV capacity per tier, Redis.
        assert any("float32 on cpu, TP 1 x SP 1" in text and "loaded in" in text for text in summary), summary
        assert any("KV cache: device 1,024 tokens (blocks of 16), host off, Redis off" in text for text in summary)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        body = {"prompt": "hi", "max_tokens": 3}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(f"{served}/health").status_code == 200  # the session's instance is unaffected
        _stream_across_sigterm(port, process)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _stream_across_sigterm(port: int, process: subprocess.Popen) -> None:
    """SIGTERM during a stream: the stream still runs to its end (drain), then the process exits."""
    body = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in "".join(rest)


def test_a_bad_model_folder_fails_fast_with_exit_2(tmp_path):
    command = [str(LONGCTX), "serve", "--model", str(tmp_path), "--port", "1"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "longctx: error:" in result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_busy_port_is_refused_before_anything_starts(model_dir):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        start = time.monotonic()
        result = subprocess.run([str(LONGCTX), "serve", "--model", model_dir, "--port", str(port)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and time.monotonic() - start < 30  # no Ray was started
    assert result.stderr.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in result.stderr


def test_missing_weights_are_one_line_before_ray_starts(model_dir, tmp_path):
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").unlink()
    result = subprocess.run([str(LONGCTX), "serve", "--model", str(folder), "--port", str(_free_port())],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "neither model.safetensors nor" in result.stderr


@pytest.mark.slow
def test_a_replica_that_fails_to_load_is_reported_once_with_its_cause(model_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model: {{path: {model_dir}, attention_backend: no_such_backend}}\n")
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run([str(LONGCTX), "serve", "--config", str(config), "--port", str(_free_port())],
                            capture_output=True, text=True, timeout=240, env=environment)  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("longctx: error:")]
    assert len(errors) == 1 and "unknown attention backend 'no_such_backend'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
