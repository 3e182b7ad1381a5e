"""The `monet` command: composes the runtime, the mask tools and the server."""
