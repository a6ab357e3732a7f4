"""Protocol buffer definitions (quadapt.v1) and their generated stubs."""
