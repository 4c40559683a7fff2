"""Constrained decoding: grammars compiled once per schema, one matcher per sample, a token bitmask per step.

xgrammar does the grammar work (chosen by measured per-token mask cost: see docs/structured_output.md).
"""

from engine.structured.bitmask import unconstrained_bitmask
from engine.structured.compiler import GrammarCompiler
from engine.structured.matcher import GrammarMatcher
from engine.structured.spec import StructuredOutput
from engine.errors import GrammarError
from engine.structured.workers import GrammarTimeout

__all__ = ["GrammarCompiler", "GrammarError", "GrammarMatcher", "GrammarTimeout", "StructuredOutput",
           "unconstrained_bitmask"]
