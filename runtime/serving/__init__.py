"""The network front doors: the gRPC server, its configuration, security and metrics, and the
client."""
