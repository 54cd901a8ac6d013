"""Talking to the server: the wire format, the HTTP clients, endpoints and auth."""
