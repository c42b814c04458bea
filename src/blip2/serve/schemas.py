"""Request and response models of the HTTP API (pydantic): what `/docs` shows and what requests are checked against.

Each endpoint has a *parameters* model (the form fields of a multipart upload) and a *request* model (the same
fields plus ``image`` as base64, for a JSON body)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TEXT_CHARS = 1000  # per prompt, question or text: longer ones are certainly not meant for a 32-token model


def _clean_text(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} is empty; it needs some text")
    return value.strip()


class Params(BaseModel):
    """An endpoint's parameters; an unknown field is refused (a misspelt one must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")
    list_fields: ClassVar[frozenset[str]] = frozenset()  # fields a multipart form may repeat


class CaptionParams(Params):
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="text the caption continues (LLM models)")
    num_beams: int | None = Field(None, ge=1, le=10, description="beam width (default: the model's, 5 or 3)")
    max_new_tokens: int | None = Field(None, ge=1, le=100, description="longest caption in tokens (default 30)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class AnswerParams(Params):
    list_fields: ClassVar[frozenset[str]] = frozenset({"questions"})
    question: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="one question")
    questions: list[str] | None = Field(None, min_length=1, description="several questions about the same image")

    @model_validator(mode="after")
    def _one_of(self) -> AnswerParams:
        if (self.question is None) == (self.questions is None):
            raise ValueError("give either 'question' (one) or 'questions' (a list), not both and not neither")
        return self

    def all_questions(self) -> list[str]:
        raw = [self.question] if self.question is not None else list(self.questions or [])
        out = []
        for i, q in enumerate(raw):
            if len(q) > MAX_TEXT_CHARS:
                raise ValueError(f"question {i + 1} is {len(q)} characters long; the limit is {MAX_TEXT_CHARS}")
            out.append(_clean_text(q, f"question {i + 1}" if len(raw) > 1 else "the question"))
        return out


class RetrieveParams(Params):
    list_fields: ClassVar[frozenset[str]] = frozenset({"texts"})
    texts: list[str] = Field(..., min_length=1, description="candidate texts, ranked by how well they match")
    k: int | None = Field(None, ge=1, description="ITC shortlist re-ranked by ITM (default: up to 16)")

    @field_validator("texts")
    @classmethod
    def _texts(cls, texts: list[str]) -> list[str]:
        for i, t in enumerate(texts):
            if len(t) > MAX_TEXT_CHARS:
                raise ValueError(f"text {i + 1} is {len(t)} characters long; the limit is {MAX_TEXT_CHARS}")
        return [_clean_text(t, f"text {i + 1}") for i, t in enumerate(texts)]


_IMAGE_FIELD = Field(..., description="the image, base64-encoded (a data: URL is fine too)")


class CaptionRequest(CaptionParams):
    image: str = _IMAGE_FIELD


class AnswerRequest(AnswerParams):
    image: str = _IMAGE_FIELD


class RetrieveRequest(RetrieveParams):
    image: str = _IMAGE_FIELD


class CaptionResponse(BaseModel):
    caption: str
    batch_size: int = Field(..., description="how many requests shared this model call")


class QuestionAnswer(BaseModel):
    question: str
    answer: str


class AnswerResponse(BaseModel):
    answers: list[QuestionAnswer]
    batch_size: int


class RankedText(BaseModel):
    index: int = Field(..., description="position in the request's texts")
    text: str
    score: float = Field(..., description="ITM match logit + ITC similarity (higher is better)")
    itc: float = Field(..., description="ITC similarity alone")


class RetrieveResponse(BaseModel):
    ranking: list[RankedText] = Field(..., description="the ITC shortlist, best match first")
    batch_size: int


class ErrorResponse(BaseModel):
    error: str


class QueueStatus(BaseModel):
    waiting: int
    capacity: int
    max_batch: int
    batches_run: int
    requests_run: int
    largest_batch: int
    rejected: int
    model_seconds: float = Field(..., description="time spent running the model")


class HealthResponse(BaseModel):
    status: str
    model: str = Field(..., description="Blip2 (stage 2, with an LLM) or Blip2QFormer (stage 1)")
    tasks: list[str] = Field(..., description="the POST endpoints this model supports")
    queue: QueueStatus
    max_upload_bytes: int
    max_pixels: int
