"""The HTML report: the verdict, the figures and the page."""
