"""A real Chromium (Playwright, Debian's /usr/bin/chromium) on the UI, and what it reads back from
the rendered page: the Vega-Lite charts' axes and marks as drawn in their SVG, the chat's answers."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CLOCK = re.compile(r"^\d\d:\d\d(:\d\d)?$")


@contextmanager
def browser_page(url: str, width: int = 1200, height: int = 1100) -> Iterator[Any]:
    """A page on ``url``; the browser's console errors and warnings are kept in ``page.console``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.console = []
            page.on("console", lambda m: page.console.append(m.text) if m.type in ("error", "warning") else None)
            page.goto(url)
            # Clicks before Gradio has wired its events are lost (a tab opened but never refreshed).
            page.get_by_text("Built with Gradio").wait_for(timeout=30000)
            page.wait_for_timeout(1000)
            yield page
        finally:
            browser.close()


@dataclass
class DrawnChart:
    """One chart as the browser drew it."""

    x_labels: list[str]
    y_labels: list[str]
    points: list[tuple[float, float]]
    """Centres of the painted point marks (a visible stroke or fill), in page pixels (y grows
    downwards): a mark without a colour is in the SVG but nobody sees it."""
    line_vertices: int
    """Vertices of the painted line paths (all series)."""

    def y_numbers(self) -> list[float]:
        return [float(label.replace(",", "")) for label in self.y_labels]


def read_chart(page: Any, title: str) -> DrawnChart | None:
    """The chart titled ``title``, or None while it is not drawn."""
    found = page.evaluate(READ_CHART, title)
    if found is None:
        return None
    return DrawnChart(found["x"], found["y"], [tuple(p) for p in found["points"]], found["vertices"])


# Vega's SVG renderer names its groups by role: role-title, role-axis (aria-label "X-axis …" /
# "Y-axis …") holding role-axis-label texts, and role-mark groups (mark-symbol for points,
# mark-line for lines). The y labels are read bottom to top, as a person reads an axis.
READ_CHART = r"""(title) => {
    for (const svg of document.querySelectorAll('svg')) {
        const heading = svg.querySelector('.role-title text');
        if (!heading || heading.textContent.trim() !== title) continue;
        const labels = (axis) => {
            const group = [...svg.querySelectorAll('.role-axis')]
                .find(g => (g.getAttribute('aria-label') || '').startsWith(axis));
            if (!group) return [];
            return [...group.querySelectorAll('.role-axis-label text')].map(t => {
                const box = t.getBoundingClientRect();
                return {text: t.textContent.trim(), x: box.x, y: box.y};
            });
        };
        const x = labels('X-axis').sort((a, b) => a.x - b.x).map(l => l.text);
        const y = labels('Y-axis').sort((a, b) => b.y - a.y).map(l => l.text);
        const painted = (p) => {
            const style = getComputedStyle(p);
            const ink = (c) => c && c !== 'none' && c !== 'transparent' && !/rgba\(.*,\s*0\)$/.test(c);
            return style.opacity !== '0' && p.getAttribute('opacity') !== '0'
                && ((ink(style.stroke) && parseFloat(style.strokeWidth) > 0) || ink(style.fill));
        };
        const points = [...svg.querySelectorAll('.mark-symbol.role-mark path')].filter(painted)
            .map(p => { const b = p.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; });
        const vertices = [...svg.querySelectorAll('.mark-line.role-mark path')].filter(painted)
            .map(p => ((p.getAttribute('d') || '').match(/[ML]/g) || []).length)
            .reduce((a, b) => a + b, 0);
        return {x, y, points, vertices};
    }
    return null;
}"""


RECORD_ANSWER = """() => {
    // The last answer's text as the page shows it, sampled in the page (see RECORD_OUTPUT).
    window.seenAnswers = [];
    window.answerSampler = setInterval(() => {
        const rows = document.querySelectorAll('#chatbot .message-row.bot-row');
        const text = rows.length ? rows[rows.length - 1].innerText.trim() : '';
        const seen = window.seenAnswers;
        if (seen.length === 0 || seen[seen.length - 1] !== text) seen.push(text);
    }, 5);
}"""


def set_max_new_tokens(page: Any, tokens: int) -> None:
    box = page.locator("#chat-max-new-tokens input[type=number]")
    box.fill(str(tokens))
    box.press("Tab")
    page.wait_for_function("(n) => document.querySelector('#chat-max-new-tokens input[type=range]').value == n",
                           arg=str(tokens), timeout=15000)


def ask_in_page(page: Any, question: str) -> tuple[list[str], str]:
    """Type ``question``, press Enter; the answers' texts seen while it streamed, and its request id."""
    request_box = page.locator("#chat-request-id textarea, #chat-request-id input").first
    before = request_box.input_value()
    page.evaluate(RECORD_ANSWER)
    page.locator("#chat-message textarea").fill(question)
    page.locator("#chat-message textarea").press("Enter")
    # The previous turn's "Done" stays until this turn's request id replaces the previous one.
    page.wait_for_function(ANSWERED, arg=before, timeout=180000)
    time.sleep(0.1)
    seen = page.evaluate("() => { clearInterval(window.answerSampler); return window.seenAnswers; }")
    return list(seen), request_box.input_value()


ANSWERED = """(before) => {
    const box = document.querySelector('#chat-request-id textarea, #chat-request-id input');
    const line = document.querySelector('#chat-status');
    return box && box.value && box.value !== before && line && line.innerText.includes('Done:');
}"""
