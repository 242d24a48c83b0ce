"""Kubernetes machinery shared by the operator and the data plane: the one client stack (`config.py`
credentials, `client.py` requests and watches), and for the operator the label-selected informers
(`informer.py`), the coalescing work queue (`workqueue.py`), server-side apply of what changed (`apply.py`) and
Events (`events.py`); for the loader and router the serving-table watcher (`tablewatch.py`) and mounted-file
change detection (`mounted.py`)."""
