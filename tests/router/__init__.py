"""Tests of the router (loraplane.router)."""
