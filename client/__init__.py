"""Clients of the broker: the mod_md hook (hook.py), the admin command (admin.py), the call they share (call.py)."""
