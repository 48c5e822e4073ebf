"""Local lm-eval tasks: YAML configs, their python hooks (utils.py) and data (data/, built by make_data.py)."""
