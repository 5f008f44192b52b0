"""Built-in tasks: small, generated, offline problems with exact rewards."""
