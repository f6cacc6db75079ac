"""Kiln notifier: relays job events and log batches from JetStream to WebSocket clients, live and resumable."""
