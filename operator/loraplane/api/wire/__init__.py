"""What crosses a process boundary, as typed models with one spelling each (extra fields refused or ignored as
each module says): `serving.py`, the operator -> loader/router serving table and the loader -> operator/router
replica report; `trainer.py`, the trainer's exit codes and termination message read by the operator."""
