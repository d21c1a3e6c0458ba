"""Loading the YAML configuration, with one clear line per problem.

Operators edit this file by hand on a live mail server, so every problem names the file, the
line and the key, and says what was expected; unknown keys get a did-you-mean. All problems are
collected in one pass instead of stopping at the first. Warnings (odd but workable settings)
are reported without refusing the file.

The modules, in the order a load goes through them: `load` (parse_config, load_config),
`reader` (the YAML nodes, and the problems recorded against their lines), `values` (what each
key accepts), `sections` (servers, aliases and the checks across keys), `problems` (what is
reported).
"""

from mailgate.configfile.load import LoadedConfig, load_config, parse_config
from mailgate.configfile.problems import ConfigError, ConfigProblem

__all__ = ["ConfigError", "ConfigProblem", "LoadedConfig", "load_config", "parse_config"]
