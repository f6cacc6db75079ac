"""Adapters: the notifier's ports to the outside (JetStream)."""
