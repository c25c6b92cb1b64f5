"""Shared test helpers: a gateway node on loopback, SMTP clients, config writers."""
