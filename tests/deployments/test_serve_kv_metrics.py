"""The KV tiers' metrics, kept in each LLM server replica's engine, scraped from the ingress's
/metrics over HTTP: labelled by replica, valid Prometheus text, and counting real tier traffic."""

from __future__ import annotations

import random
import shutil
import subprocess

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

APP = "longctx-kv-tiers"
MODEL = "tiny"


@pytest.fixture(scope="module")
def tiers_url(make_config, deployed_app):
    # 40 device blocks of 16 tokens hold one 400-token document at a time: the next one evicts
    # it, its blocks spill to the host tier, and asking for it again restores them from there.
    config = make_config(ingress_num_cpus=0.5).with_overrides({
        "cache.num_device_blocks": 40,
        "kv_tiers.host_bytes": 1 << 20,
        "kv_tiers.restore_policy": "always",  # restore whatever the measured speeds say
    })
    with deployed_app(config, APP) as url:
        yield url


def _document(seed: int, num_tokens: int = 400) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(num_tokens)]


def test_replica_kv_tier_series_appear_in_the_ingress_metrics(tiers_url):
    client = openai.OpenAI(base_url=f"{tiers_url}/v1", api_key="unused", max_retries=0, timeout=60)
    document, filler = _document(7), _document(8)
    for prompt in (document, filler, document):
        last = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert last.usage.prompt_tokens_details.cached_tokens > 0
    text = httpx.get(f"{tiers_url}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    hits = {sample.labels["tier"]: sample for sample in families["longctx_kv_hit_tokens"].samples}
    assert hits["host"].name == "longctx_kv_hit_tokens_total"
    assert hits["host"].value > 0
    assert hits["host"].labels["replica"]  # the replica's id
    spilled = families["longctx_kv_transfer_bytes"].samples
    assert any(s.labels["path"] == "device_to_host" and s.value > 0 for s in spilled)
    assert text.count("# TYPE longctx_kv_hit_tokens_total counter") == 1
    _promtool_check(text)


def _promtool_check(text: str) -> None:
    """Prometheus's own parser and linter, where promtool is installed (the Python parser above is
    the check otherwise). Exit 1: the text does not parse; 3: lint remarks, one per line."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output  # parses, and no naming remark on any series
