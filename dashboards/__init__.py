"""Grafana dashboards of longctx, generated with grafana-foundation-sdk's typed builders.

`catalog.py` lists them; `serving.py` and `kv_tiers.py` define their panels over the series that
deployments/metrics.py and kvcache/tier_metrics.py export; `export.py` writes the JSON files (the
Helm chart ships them) and pushes them to a Grafana through grafana-client; `pictures.py` draws
them from a Prometheus with matplotlib for docs/.
"""
