"""Grammar-constrained decoding (xgrammar) and tool-call parsers."""
