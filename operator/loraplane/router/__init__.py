"""The OpenAI-compatible router in front of a ModelRoute's vLLM replicas (see docs/router.md).

Run it as `python -m loraplane.router` or `loraplane router`.
"""
