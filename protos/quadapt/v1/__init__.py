"""Protocol version 1: `generation.proto` and its generated stubs (do not edit those by hand)."""
