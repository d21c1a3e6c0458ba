"""mailgate: Odoo's mail rules for an on-premise Postfix."""
