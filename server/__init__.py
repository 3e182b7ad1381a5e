"""The REST service: generation with mask profiles, mask management, metrics, auth.

Talks to an Engine (server.engine) and a MaskStore; never imports torch.
    from server.main import create_app
    app = create_app(engine=engine, store=store, settings=Settings())
"""
