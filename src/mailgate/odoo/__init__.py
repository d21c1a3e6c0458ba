"""Talking to Odoo: handing accepted mail to its mail gateway (`mailgate deliver`)."""
