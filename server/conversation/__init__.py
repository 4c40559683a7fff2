"""The one conversation core under every protocol route (chat completions, Responses, Messages).

A protocol module translates its request into a `Conversation`, calls `prepare` (prompt ids,
grammar, parser, budget), runs the engine, and renders the `Event`s that `OutputEvents` makes
from engine outputs (streamed) or from the collected completion (`OutputEvents.whole`, then
`fold`). Templates, harmony, tool parsing, grammars and the context budget live only here.
"""

from server.conversation.events import (Event, Finish, FoldedCall, FoldedMessage, ReasoningDelta, TextDelta,
                                        ToolCallArguments, ToolCallStart, Usage, fold)
from server.conversation.items import (Conversation, Grammar, Tool, ToolCallItem, Turn, repeated_tool_name,
                                       unoffered_tool)
from server.conversation.output import ChoiceEvents, OutputEvents
from server.conversation.prepare import PreparedPrompt, prepare
from server.conversation.render import render_prompt

__all__ = ["ChoiceEvents", "Conversation", "Event", "Finish", "FoldedCall", "FoldedMessage", "Grammar",
           "OutputEvents", "PreparedPrompt", "ReasoningDelta", "TextDelta", "Tool", "ToolCallArguments",
           "ToolCallItem", "ToolCallStart", "Turn", "Usage", "fold", "prepare", "render_prompt",
           "repeated_tool_name", "unoffered_tool"]
