"""The intake core: one SMTP intake shared by every transport (inetd, serve).

Lean: imported by the inetd receiver; this file imports nothing.
"""
