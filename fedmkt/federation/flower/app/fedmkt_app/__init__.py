"""Flower App components for FedMKT: thin re-exports of `fedmkt.federation.flower`."""
