"""The documentation holds together: every section number cited from docs/METHOD.md exists there, every
relative link of README.md and docs/*.md reaches an existing file (and, with an #anchor into a markdown
file, an existing heading), and README.md stays a guide of at most 650 lines.

Citations: in this repository the section sign is reserved for docs/METHOD.md, so every "SECTION N" or
"SECTION N.M" in a .py or .md file (SECTION being the section sign), including both ends of a range
"SECTION 3.5-SECTION 3.7" or "SECTION 6.3-6.5", must name a heading "## N. ..." or "### N.M ..." of that file.
"""
import functools
import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION_SIGN = "\N{SECTION SIGN}"
NUMBER = r"(\d+(?:\.\d+)*)"
# a cited section, and the end of a range after it (with or without its own section sign)
CITATION = re.compile(SECTION_SIGN + NUMBER + r"(?:\s*[-\N{EN DASH}]\s*" + SECTION_SIGN + r"?" + NUMBER + r")?")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SECTION_HEADING = re.compile(r"^#{2,4}\s+" + NUMBER + r"\.?\s")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
README_MAX_LINES = 650


def source_files():
    """The repository's .py and .md files: git's tracked and new ones, so that the datasets and results under
    data/ and result/ (git-ignored) are not walked; outside a git checkout, the same by the folders' names."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard",
                                 "*.py", "*.md"], capture_output=True, text=True, check=True, timeout=60).stdout
        return sorted(path for path in (ROOT / name for name in listed.splitlines()) if path.is_file())
    except (OSError, subprocess.SubprocessError):
        def ours(parts):  # data/ holds the package's modules and, below them, the datasets
            return not (any(part.startswith(".") or part in ("__pycache__", "result") for part in parts)
                        or (parts[0] == "data" and len(parts) > 2))
        return sorted(path for path in ROOT.rglob("*") if path.suffix in (".py", ".md") and path.is_file()
                      and ours(path.relative_to(ROOT).parts))


def method_sections(text):
    """{"3", "3.5", ...}: the numbers of the numbered headings of docs/METHOD.md."""
    return {match.group(1) for line in text.splitlines() if (match := SECTION_HEADING.match(line))}


def cited_sections(text):
    """[(line number, "3.5"), ...]: every section number cited in `text`, both ends of a range included."""
    cited = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        cited += [(line, number) for number in match.groups() if number]
    return cited


def without_fenced_blocks(markdown):
    """The markdown's lines, those of fenced code blocks (fences included) blanked."""
    lines, in_fence = [], False
    for line in markdown.splitlines():
        fence = bool(FENCE.match(line.strip()))
        in_fence ^= fence
        lines.append("" if fence or in_fence else line)
    return lines


def outside_code(markdown):
    """The markdown without fenced blocks and inline code (a link there is not a link)."""
    return INLINE_CODE.sub("", "\n".join(without_fenced_blocks(markdown)))


def github_anchor(heading_text):
    """The anchor GitHub gives a heading: its text without markup, lower-cased, every character other than a
    letter, a mark, a digit, an underscore, a hyphen or a space dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading_text)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    kept = "".join(ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in "LM"
                   or unicodedata.category(ch) == "Nd")
    return kept.replace(" ", "-")


def heading_anchors(markdown):
    """Every anchor of the markdown's headings, a repeated one numbered -1, -2, ... as GitHub does."""
    anchors, seen = set(), {}
    for line in without_fenced_blocks(markdown):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


@functools.lru_cache(maxsize=None)
def anchors_of(markdown_file):
    return heading_anchors(markdown_file.read_text())


def broken_links(markdown_file):
    """["target: what is wrong", ...] for the relative links of one markdown file."""
    problems = []
    for match in LINK.finditer(outside_code(markdown_file.read_text())):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        linked = (markdown_file.parent / path_part).resolve() if path_part else markdown_file
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
            problems.append(f"{target}: {linked.name} has no heading with the anchor #{anchor}")
    return problems


def test_every_cited_method_section_exists():
    sections = method_sections((ROOT / "docs" / "METHOD.md").read_text())
    assert {"1", "2", "3", "3.1"} <= sections  # the headings parse at all
    missing = [f"{path.relative_to(ROOT)}:{line}: {SECTION_SIGN}{number}"
               for path in source_files()
               for line, number in cited_sections(path.read_text())
               if number not in sections]
    assert not missing, "cited sections that docs/METHOD.md does not have:\n" + "\n".join(missing)


def test_every_relative_link_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [f"{path.relative_to(ROOT)}: {problem}" for path in files for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_guide_of_bounded_length():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, more than {README_MAX_LINES}: move reference "
                                       "material to docs/ and link it")


# ---- the checks themselves, on hand-made inputs ----

def test_citations_are_found_with_both_ends_of_a_range():
    text = (f"see docs/METHOD.md {SECTION_SIGN}3.5-{SECTION_SIGN}3.7 and\n"
            f"METHOD {SECTION_SIGN}6.3-6.5, {SECTION_SIGN}8.2. Also {SECTION_SIGN}10\N{EN DASH}{SECTION_SIGN}11")
    assert cited_sections(text) == [(1, "3.5"), (1, "3.7"), (2, "6.3"), (2, "6.5"), (2, "8.2"), (2, "10"),
                                    (2, "11")]


def test_method_headings_are_parsed_by_their_numbers():
    text = "# Title\n\n## 3. Evaluation\n\n### 3.5 Conventions\n\n## Notation\n### 10.2 Ten two\n    ## 4. indented\n"
    assert method_sections(text) == {"3", "3.5", "10.2"}


@pytest.mark.parametrize("heading, anchor", [
    ("Quick start (CPU, no download)", "quick-start-cpu-no-download"),
    ("The embedded dataset: `digits`", "the-embedded-dataset-digits"),
    ("Where a run's time goes", "where-a-runs-time-goes"),
    ("Conventions, graded metrics and the standalone evaluator", "conventions-graded-metrics-and-the-standalone-evaluator"),
    ("3.5 Conventions of mAP: denominator, queries without a hit, ties",
     "35-conventions-of-map-denominator-queries-without-a-hit-ties"),
    ("8.1 Hierarchical proxies (HPL) — `--hierarchy K`", "81-hierarchical-proxies-hpl----hierarchy-k"),
])
def test_anchors_follow_githubs_rules(heading, anchor):
    assert github_anchor(heading) == anchor


def test_a_broken_link_and_a_missing_anchor_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-section) [second](other.md#a-section-1) [here](#page) [web](https://x.org/y)\n"
                    "[gone](missing.md) [no anchor](other.md#nowhere)\n"
                    "```\n[in a code block](absent.md)\n```\n`[inline](absent.md)`\n\n# Page\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#nowhere: other.md has no heading with the anchor #nowhere"]
