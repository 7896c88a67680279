"""The inetd receiver, smap (imports nothing: it runs once per SMTP connection)."""
