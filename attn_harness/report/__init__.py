"""Figures (figures.py), checkpoint comparison (compare.py) and self-contained HTML reports (html.py)."""
