"""What the driver and the model workers say to each other, and the rules both must agree on.

Torch-free and import-free of every other longctx package: the driver (engine/, kvcache/) and the
workers (model_shards/) each import only themselves, this package, `model_folder/` and the config.
- `step.py`: the per-step messages (StepInput / StepOutput) and the sampled tokens;
- `sampling_params.py`: a request's sampling parameters, validated once;
- `kv_transfer_ops.py`: the KV-tier moves the driver orders and the report the worker returns;
- `kv_fingerprint.py`: the one rule naming a model's KV (prefix hashes and Redis keys);
- `redis_urls.py`: the one parser of Redis URLs (config validation and the worker's store);
- `worker_description.py`: what a worker tells the driver about its KV cache at start-up.
"""
