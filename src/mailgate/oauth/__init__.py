"""OAuth2 access tokens for upstream servers that log in with XOAUTH2 (Gmail, Microsoft 365)."""
