"""Generated protobuf code (checked in; regenerate with make proto)."""
