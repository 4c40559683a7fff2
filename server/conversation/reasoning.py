"""reasoning_effort: every value of OpenAI's spec, mapped onto what a model's prompt format knows.

Harmony (gpt-oss) and the chat templates that read `reasoning_effort` know three levels,
low / medium / high: "none" and "minimal" become low, "xhigh" and "max" become high.
Templates with a thinking switch (`enable_thinking`, as Qwen3's) have it turned off for "none".
"""

from __future__ import annotations

from typing import Any, Literal

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
Level = Literal["low", "medium", "high"]

LEVELS: dict[str, Level] = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                            "xhigh": "high", "max": "high"}


def effort_level(effort: Effort | None) -> Level | None:
    """The model-side level of a requested effort (None: the model's default)."""
    return None if effort is None else LEVELS[effort]


def template_arguments(effort: Effort | None) -> dict[str, Any]:
    """Extra chat-template variables for the effort (templates ignore the ones they do not read)."""
    if effort is None:
        return {}
    arguments: dict[str, Any] = {"reasoning_effort": LEVELS[effort]}
    if effort == "none":
        arguments["enable_thinking"] = False
    return arguments
