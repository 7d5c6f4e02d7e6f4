"""Reading a Hugging Face model folder without torch: its architecture (config.json) and tokenizer.

Both sides need it: the driver to tokenize, detokenize and size contexts; the workers to build the
model. `model_shards/` turns the architecture into tensors.
"""
