"""`mailgate import-odoo`: turn an Odoo database's mail settings into a mailgate configuration.

An operator moving from Odoo's own outgoing servers to mailgate should not retype what Odoo
already knows: the servers (`ir_mail_server`), the alias domain with its catchall, bounce and
default From (system parameters up to Odoo 16, `mail_alias_domain` from Odoo 17), the business
aliases (`mail_alias`), the loop guard and the mass-mailing server. The database is opened
read-only; the generated YAML names the Odoo source of every value, says which keys keep
mailgate's default, and is checked with mailgate's own loader before it is handed out.
Passwords go only into 0600 files next to it, never into the YAML, a message or a log.
"""

from mailgate.commands.importodoo.command import import_odoo, main_import
from mailgate.commands.importodoo.model import MASS_PORT, SUBMISSION_PORT, ImportFailed, ImportResult

__all__ = ["ImportFailed", "ImportResult", "MASS_PORT", "SUBMISSION_PORT", "import_odoo", "main_import"]
