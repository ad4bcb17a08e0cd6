"""Small helpers every part of the product shares: errors, files, strict YAML, redaction."""
