"""Authentication and authorization of the API (docs/security.md)."""
