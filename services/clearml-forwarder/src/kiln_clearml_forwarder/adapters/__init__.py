"""Adapters: the ClearML SDK and the NATS KV task map."""
