"""The `quadapt` protobuf package; versions below it (`v1`)."""
