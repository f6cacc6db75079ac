"""Framework integrations of the Kiln SDK (each imports its framework lazily, never at ``import kiln_sdk``)."""
