"""The claims as a reader sees them: one table, one row per claim (the paper's statement, the rule, the measured
numbers, the verdict), the same in notebook 06 and in the HTML report (:mod:`lwlib.report`).

A claim record (``<run>/claims.json``, :func:`lwlib.claims.collect_claims`) has ``id``, ``paper``, ``rule``,
``measured`` and ``reproduced``, and may have ``summary`` (the measured numbers already written out for a reader,
intervals included; shown as given, line breaks kept), ``reproduced_by_decoding`` (``{decoding: bool}``) and
``why`` (why a claim is not reproduced or incomplete). ``reproduced`` is ``true``, ``false`` or ``null``
(incomplete: not measured enough to decide). Without a ``summary``, ``measured`` is written out by
:func:`format_measured`: nested mappings as indented ``key: value`` lines, lists of numbers joined by `` / ``,
numbers rounded for reading (77.64999999999999 -> 77.6, 1768.3 -> 1,768); nothing is cut short.

Where the profile is too small for any verdict to mean anything (the profile's ``too_small_for_verdicts``, true
for ``smoke``), a banner above the table says so.

Usage::

    ClaimsTable(records, profile=prof)           # notebook 06: displayed as an HTML table, printed as text
    ClaimsTable(records, profile=resolved_profile_dict).to_html()   # the HTML report
"""

from __future__ import annotations

import html
import math
import textwrap
from typing import Any

VERDICTS = {True: ("reproduced", "#1a7f37"), False: ("not reproduced", "#c62828"), None: ("incomplete", "#8a6d00")}


def fmt_number(x: Any) -> str:
    """A number for reading: thousands separated, 3 significant digits below 100 and none above (no float noise:
    77.64999999999999 -> ``77.6``, 1768.3 -> ``1,768``); ``None`` -> ``none``, NaN -> ``n/a``, booleans -> yes/no."""
    if x is None:
        return "none"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if not isinstance(x, float):
        return str(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if abs(x) >= 100 or x.is_integer():
        return f"{x:,.0f}"
    text = f"{x:.3g}"
    return f"{x:#.3g}" if text.lstrip("-").isdigit() else text  # 3.996 -> 4.00, not 4


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def format_measured(value: Any, indent: int = 0) -> str:
    """``measured`` as lines a reader takes in: scalars by :func:`fmt_number`, lists of scalars joined by `` / ``,
    mappings as ``key: value`` lines (nested ones indented two spaces; a nested mapping of scalars on one line,
    ``key: a=1, b=2``), lists of mappings as ``-`` items."""
    pad = "  " * indent
    if _scalar(value):
        return pad + fmt_number(value)
    if isinstance(value, (list, tuple)):
        if all(_scalar(v) for v in value):
            return pad + " / ".join(fmt_number(v) for v in value)
        return "\n".join(pad + "- " + format_measured(v, indent + 1).lstrip() for v in value)
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if _scalar(v) or (isinstance(v, (list, tuple)) and all(_scalar(x) for x in v)):
                lines.append(f"{pad}{k}: {format_measured(v)}")
            elif isinstance(v, dict) and v and all(_scalar(x) for x in v.values()):  # one line: k=v, k=v
                lines.append(f"{pad}{k}: " + ", ".join(f"{kk}={fmt_number(x)}" for kk, x in v.items()))
            else:
                lines.append(f"{pad}{k}:")
                lines.append(format_measured(v, indent + 1))
        return "\n".join(lines)
    return pad + str(value)


def measured_text(record: dict[str, Any]) -> str:
    """The record's ``summary`` when it has one, else its ``measured`` by :func:`format_measured`."""
    summary = record.get("summary")
    if isinstance(summary, str) and summary.strip():
        return summary.strip()
    return format_measured(record.get("measured"))


def verdict_text(record: dict[str, Any]) -> tuple[str, str]:
    """``(verdict, details)``: reproduced / not reproduced / incomplete, and the per-decoding verdicts and the
    ``why`` of the record (empty when it has neither)."""
    rep = record.get("reproduced")
    verdict = VERDICTS.get(rep if isinstance(rep, bool) or rep is None else bool(rep))[0]
    details = []
    by = record.get("reproduced_by_decoding")
    if isinstance(by, dict) and by and list(by) != ["all"]:
        details.append(", ".join(f"{d}: {VERDICTS.get(v if isinstance(v, bool) else None)[0]}" for d, v in by.items()))
    if record.get("why"):
        details.append(str(record["why"]))
    return verdict, "\n".join(details)


def too_small_for_verdicts(profile: Any) -> bool:
    """Whether ``profile`` (a :class:`lwlib.config.Profile` or a manifest's resolved profile mapping) says its
    verdicts mean nothing."""
    if profile is None:
        return False
    if isinstance(profile, dict):
        return bool(profile.get("too_small_for_verdicts", False))
    return bool(getattr(profile, "too_small_for_verdicts", False))


def banner_text(profile: Any) -> str | None:
    """The warning shown above the claims of a profile too small for verdicts (None otherwise)."""
    if not too_small_for_verdicts(profile):
        return None
    name = profile.get("profile") if isinstance(profile, dict) else getattr(profile, "name", "")
    return (f"Profile {name} is far too small for these verdicts to mean anything (too_small_for_verdicts: true): "
            "it runs every stage for a few steps on tiny data to show that the pipeline works end to end. "
            "The claims are tested by the gpu and paper profiles (README, Results).")


def summary_line(records: list[dict[str, Any]]) -> str:
    """``"1 of 4 claims reproduced, 2 not reproduced, 1 incomplete"``."""
    counts = {v: sum(1 for r in records if verdict_text(r)[0] == v) for v, _ in VERDICTS.values()}
    parts = [f"{counts['reproduced']} of {len(records)} claims reproduced"]
    parts += [f"{counts[k]} {k}" for k in ("not reproduced", "incomplete") if counts[k]]
    return ", ".join(parts)


_STYLE = ("border-collapse:collapse;font-size:13px;line-height:1.35;text-align:left;width:100%;"
          "table-layout:fixed")
_CELL = "border:1px solid #ccc;padding:6px 8px;vertical-align:top;text-align:left;white-space:pre-wrap;" \
        "overflow-wrap:anywhere"
_WIDTHS = (("claim", "12%"), ("the paper", "24%"), ("rule", "22%"), ("measured", "28%"), ("verdict", "14%"))


class ClaimsTable:
    """The claims of a run as one table: ``_repr_html_`` (a notebook shows it), ``str`` (plain text: the executed
    notebook's text copy, a console) and :meth:`to_html` (the report). ``profile``: the run's profile (a
    :class:`lwlib.config.Profile` or a manifest's resolved mapping), for the banner."""

    def __init__(self, records: list[dict[str, Any]], profile: Any = None):
        self.records = list(records)
        self.banner = banner_text(profile)

    def rows(self) -> list[dict[str, str]]:
        """One mapping per claim: claim, the paper, rule, measured, verdict, details."""
        out = []
        for r in self.records:
            verdict, details = verdict_text(r)
            out.append({"claim": str(r.get("id", "")), "the paper": str(r.get("paper", "")),
                        "rule": str(r.get("rule", "")), "measured": measured_text(r), "verdict": verdict,
                        "details": details})
        return out

    def to_html(self) -> str:
        """The table (and the banner) as an HTML fragment with inline styles."""
        parts = []
        if self.banner:
            parts.append('<div style="border:2px solid #c62828;background:#fdecea;padding:8px 12px;margin:8px 0;'
                         f'font-weight:600">{html.escape(self.banner)}</div>')
        if not self.records:
            return "".join(parts) + "<p>No claim measured in this run.</p>"
        parts.append(f"<p>{html.escape(summary_line(self.records))}</p>")
        head = "".join(f'<th style="{_CELL};width:{w};background:#f3f3f3">{html.escape(h)}</th>' for h, w in _WIDTHS)
        body = []
        for row in self.rows():
            colour = next(c for v, c in VERDICTS.values() if v == row["verdict"])
            verdict = f'<b style="color:{colour}">{html.escape(row["verdict"])}</b>'
            if row["details"]:
                verdict += f'<br><span style="color:#555">{html.escape(row["details"])}</span>'
            cells = [f"<code>{html.escape(row['claim'])}</code>", html.escape(row["the paper"]),
                     html.escape(row["rule"]), html.escape(row["measured"]), verdict]
            body.append("<tr>" + "".join(f'<td style="{_CELL}">{c}</td>' for c in cells) + "</tr>")
        parts.append(f'<table class="lwlib-claims" style="{_STYLE}"><tr>{head}</tr>{"".join(body)}</table>')
        return "".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        lines = []
        if self.banner:
            lines += ["!" * 100, *textwrap.wrap(self.banner, 100), "!" * 100, ""]
        if not self.records:
            return "\n".join(lines + ["No claim measured in this run."])
        lines.append(summary_line(self.records))
        for row in self.rows():
            lines += ["", f"{row['claim']}: {row['verdict'].upper()}"]
            if row["details"]:
                lines += ["  " + d for d in row["details"].splitlines()]
            for key in ("the paper", "rule"):
                lines += textwrap.wrap(row[key], 110, initial_indent=f"  {key}: ", subsequent_indent="    ")
            lines.append("  measured:")
            lines += ["    " + m for m in row["measured"].splitlines()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)
