"""The HTTP service (``meterflow serve``): ingest of usage events over HTTP (``ingest.py`` its rules, ``app.py`` the ASGI app)."""
