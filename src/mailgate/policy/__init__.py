"""The socketmap lookup service and the SMTP access policy service."""
