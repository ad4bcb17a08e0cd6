"""The central collector: mTLS gRPC server, event store, subscriptions and enrollment."""
