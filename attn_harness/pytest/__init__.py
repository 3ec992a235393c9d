"""The pytest face: the plugin that collects spec files and the baseline regression check."""
