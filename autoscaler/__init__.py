"""Replica autoscaling by queued context tokens, and a simulator that compares it with request counts.

signal.py   what a replica owes (prefill tokens and seconds net of prefix hits, KV, decode load)
capacity.py how many replicas a load needs (Little's law in tokens, lanes, KV, decode)
policy.py   the decision: fast up, slow down with hysteresis, hold while long requests run
serve_policy.py  the policy on Ray Serve's custom autoscaling interface
ongoing_requests.py  Ray Serve's default policy, the baseline the simulator compares against
simulator/  the discrete-event model and `longctx autoscale`
Everything but serve_policy.py is plain Python: no Ray, no torch.
"""
