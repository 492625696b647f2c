"""Report writers for `mdeploy check` and `mdeploy bench`: JUnit XML for CI, Markdown for pull-request comments and
one self-contained HTML page. Each takes the report as the plain dict that `--json` prints (or a saved copy of it)."""

from mdeploy.reporting.html import html_report, write_html
from mdeploy.reporting.junit import junit_xml, write_junit
from mdeploy.reporting.markdown import markdown_summary

__all__ = ["html_report", "junit_xml", "markdown_summary", "write_html", "write_junit"]
