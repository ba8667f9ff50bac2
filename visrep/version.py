"""The package version (its own module, so any part can read it without importing the whole package)."""
__version__ = "0.1.0"
# Bumped when a default changes what a saved config means (2: iLLaMA, HPM/MAE decoders and GCR as their official
# code). A run saved under another value is not resumed: the same config would now train differently.
DEFAULTS_VERSION = 2
