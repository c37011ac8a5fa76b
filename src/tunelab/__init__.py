"""tunelab: fine-tune pre-trained language models on your own data, safely."""

__version__ = "0.1.0"
