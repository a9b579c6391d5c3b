"""Federated algorithms as explicit state + update functions (FedAvg, FedSGD, personalization)."""
