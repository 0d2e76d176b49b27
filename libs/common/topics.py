"""Topic (stream/subject) names of the bus, one constant per message kind."""

from typing import Final

TEXT_SUBMITTED: Final = "flockwatch.texts"
VOTE_CAST: Final = "flockwatch.votes"
VOTE_REQUESTED: Final = "flockwatch.vote_requests"
DECISION_MADE: Final = "flockwatch.decisions"
FEEDBACK_SUBMITTED: Final = "flockwatch.feedback"
MODEL_PUBLISHED: Final = "flockwatch.models"
DEAD_LETTER: Final = "flockwatch.deadletter"

ALL: Final = (
    TEXT_SUBMITTED,
    VOTE_CAST,
    VOTE_REQUESTED,
    DECISION_MADE,
    FEEDBACK_SUBMITTED,
    MODEL_PUBLISHED,
    DEAD_LETTER,
)
