"""The fleet router: an OpenAI-compatible proxy that sends each request to the replica most
likely to hold its prefix in KV cache, unless that replica is far busier than the rest.

config.py (RouterConfig), replicas.py (health and load), prefix_index.py (who cached what),
prompt_text.py (what a request is routed by), policy.py (where it goes), upstream.py and
forward.py (one attempt, and the attempts in turn), metrics.py, proxy.py (the app), cli.py.
"""
