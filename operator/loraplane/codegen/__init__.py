"""Build-time generation from the API models (`loraplane crds`; a test fails when an output is stale): the CRDs
(`crds.py` -> crds/), the chart's CRD templates (`chart.py`), the API reference (`reference.py` ->
docs/api-reference.md) and the troubleshooting page (`troubleshooting.py`, from api/reasons.py)."""
