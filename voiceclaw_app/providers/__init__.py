"""Providers: one file per service or engine, each implementing an interface of :mod:`.base`."""
