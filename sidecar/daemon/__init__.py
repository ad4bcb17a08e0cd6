"""The host daemon: its stages, configuration, admin socket and systemd notification."""
