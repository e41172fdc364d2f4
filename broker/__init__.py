"""apache-restart-broker: activates mod_md's renewed certificates with a verified graceful restart."""

__version__ = "0.1.0"
