"""The paper's claims as commands, runnable on any prior (docs/claims.md)."""
