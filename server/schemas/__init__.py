"""Request and response bodies, one module per resource (pydantic; they make the OpenAPI)."""
