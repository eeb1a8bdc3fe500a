"""SafeURL Worker: scans URLs in locked-down containers, driven by a Redis stream, with every
state change a versioned, audited write in PostgreSQL."""

__version__ = "0.1.0"
