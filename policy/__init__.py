"""Not a package: the lookup and policy services are `mailgate.policy` (src/mailgate/policy/).

This folder is a map of that package (README.md). Importing it from the repository root fails
here on purpose, instead of giving an empty namespace package named `policy`.
"""

raise ImportError("policy/ is a map of the package mailgate.policy (src/mailgate/policy/): import mailgate.policy")
