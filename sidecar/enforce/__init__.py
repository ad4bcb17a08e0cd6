"""From a compiled policy to the kernel's policy maps."""
