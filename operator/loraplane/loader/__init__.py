"""The adapter loader: a sidecar beside each vLLM replica that makes its loaded LoRA adapters equal the
route's serving table, refuses incompatible ones before they reach vLLM, and reports what it really serves.

Run it as `python -m loraplane.loader` or `loraplane loader` (see docs/loader.md).
"""
