"""The control plane: one controller per kind (finetunejob.py, adapter.py, modelroute.py), each owning its state
and reconciling as observe -> plan -> execute; the manager that wires them to the informers (manager.py); and
kopf's handlers that run the process (handlers.py: `loraplane operator`, or `kopf run -m
loraplane.controllers.handlers`). Importing this package imports neither kopf nor the manager."""
