"""Suite-wide settings: quiet TransformerLens deprecation warnings, deterministic threads."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
