"""`longctx serve --tp 2 --sp 2 --span-nodes` over two simulated Ray nodes (separate raylets with
their own CPUs, gloo between the ranks): each TP group stays on one node, the SP groups land on
different nodes, and greedy completions through the official openai client equal one rank's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import openai
import pytest

from engine.offline import generate
from protocol.sampling_params import SamplingParams

pytest.importorskip("ray")

HERE = Path(__file__).parent
LONGCTX = Path(sys.executable).parent / "longctx"
# Per node: the replica (1 CPU) and one TP group (2 ranks x 1 CPU) fill it; the other TP group and
# the ingress must take the second node.
CPUS_PER_NODE = 3
PROMPTS = ["The contract says that the tenant", " ".join(f"clause {i} binds the parties." for i in range(30))]


@pytest.fixture(scope="module")
def two_nodes():
    process = subprocess.Popen([sys.executable, str(HERE / "two_node_cluster.py"), str(CPUS_PER_NODE)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("address "), f"the cluster did not start: {line!r}"
        yield process, line.split()[1]
    finally:
        process.stdin.close()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def served_across_nodes(two_nodes, model_dir, tmp_path_factory):
    _, address = two_nodes
    config_file = tmp_path_factory.mktemp("multinode") / "config.yaml"
    config_file.write_text("serve: {ingress_num_cpus: 0.5}\n")
    port = _free_port()
    command = [str(LONGCTX), "serve", "--model", model_dir, "--port", str(port), "--tp", "2", "--sp", "2",
               "--span-nodes", "--block-size", "16", "--num-kv-blocks", "512", "--max-tokens-per-step", "512",
               "--config", str(config_file)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "RAY_ADDRESS": address})
    try:
        _wait_for_serving(process, timeout_s=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()


def test_tp_groups_stay_on_a_node_and_sp_crosses_nodes(two_nodes, served_across_nodes):
    cluster, _ = two_nodes
    cluster.stdin.write("placement SERVE_REPLICA::longctx#LLMServer#\n")
    cluster.stdin.flush()
    import json

    bundles = {int(index): node for index, node in json.loads(cluster.stdout.readline()).items()}
    assert sorted(bundles) == [0, 1, 2]  # the engine, then one bundle per SP rank (its TP group of 2)
    assert bundles[1] != bundles[2]  # the two SP ranks are on different nodes
    assert Counter(bundles.values()).most_common(1)[0][1] == 2  # the engine shares a node with one


def test_greedy_completions_across_nodes_equal_one_rank_s(served_across_nodes, reference_engine):
    client = openai.OpenAI(base_url=f"{served_across_nodes}/v1", api_key="unused", max_retries=0, timeout=120)
    one_rank = generate(reference_engine, PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for prompt, [expected] in zip(PROMPTS, one_rank):
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert response.choices[0].text == expected.text


def _wait_for_serving(process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "serving" in line:
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"longctx serve exited with {process.returncode}")
    raise AssertionError("longctx serve did not come up")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
