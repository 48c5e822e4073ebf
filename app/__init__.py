"""The top floor: the `communs` command and what orchestrates several packages (the demo).

Nothing of ours imports this package.
"""
