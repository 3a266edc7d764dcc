"""Agent protocol: tags, parser, stop sequences."""

from tepo_ray.agent.protocol import (
    ACTION_TAGS,
    ALL_TAGS,
    SPECIAL_TOKENS,
    TOOL_TAGS,
    Action,
    AnswerAction,
    Malformed,
    NoAction,
    ParsedResponse,
    ToolAction,
    format_observation,
    parse_response,
    parse_turn,
    stop_strings,
    stop_token_ids,
)

__all__ = [
    "ACTION_TAGS",
    "ALL_TAGS",
    "SPECIAL_TOKENS",
    "TOOL_TAGS",
    "Action",
    "AnswerAction",
    "Malformed",
    "NoAction",
    "ParsedResponse",
    "ToolAction",
    "format_observation",
    "parse_response",
    "parse_turn",
    "stop_strings",
    "stop_token_ids",
]
