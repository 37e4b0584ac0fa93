"""Federated training with buffered asynchronous aggregation (FedBuff), label DP at the
clients. See docs/ARCHITECTURE.md and shared/specs/federated.md."""
