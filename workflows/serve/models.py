"""The HTTP boundary's request and response models (pydantic; the OpenAPI description at ``/docs``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workflows.pipeline import DEFAULT_FPS, MAX_MOTION, MAX_SEED
from workflows.serve.jobs import EDIT_STATES, JOB_STATES, TUNING_PHASES

MotionStep = Annotated[float, Field(ge=-MAX_MOTION, le=MAX_MOTION, allow_inf_nan=False)]


class VideoRequest(BaseModel):
    """A video to generate; omitted fields take ``mav generate``'s defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000, description="the text x")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random if omitted (answered in X-Seed / the job)")
    fps: int = Field(DEFAULT_FPS, ge=1, le=30, description="keyframe rate D^t is conditioned on; plays at fps × skip")
    steps: int | None = Field(None, ge=1, le=1000, description="sampling steps of every diffusion stage (preset's if omitted)")
    guidance: float | None = Field(None, ge=0, le=50, allow_inf_nan=False, description="decoder guidance scale w")
    negative_prompt: str = Field("", max_length=4000, description="the prior's unconditional branch")
    motion: list[MotionStep] | None = Field(
        None, min_length=2, max_length=2, description="motion guidance [dy, dx]: frame sizes per keyframe that the common part of D^t's noise "
                          "moves (noise warping, as in Go-with-the-Flow); off if omitted")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class JobCreated(BaseModel):
    id: str
    status: str
    seed: int


class StageState(BaseModel):
    name: str
    status: str = Field(description="pending, running or done")
    seconds: float | None = None
    batch_size: int | None = Field(None, description="rows in the forward pass this job shared")


class WorkStatus(BaseModel):
    """What a job and an edit both report."""

    id: str
    request: dict
    created: float
    updated: float
    stages: list[StageState]
    progress: float
    error: str | None = None
    video_fps: float | None = None
    retries: list[str] = Field(default_factory=list, description="each time it resumed at a stage whose "
                               "replica was lost: the stage and what happened")


class JobStatus(WorkStatus):
    status: str = Field(description=" / ".join(JOB_STATES))
    progress: float = Field(description="fraction of stages done")
    output: str | None = Field(None, description="where the video was written, when the server has an output URL")


class ErrorBody(BaseModel):
    error: str


class TuningState(BaseModel):
    phase: str = Field(description=" / ".join(TUNING_PHASES))
    step: int = Field(description="optimizer steps done (as the loss log last recorded)")
    steps: int
    loss: float | None = Field(None, description="training loss at the last log step")
    seconds: float | None = Field(None, description="wall time of the tuning, when done")


class EditVideo(BaseModel):
    prompt: str
    seed: int
    url: str = Field(description="where to GET the MP4 (relative to this server)")
    output: str | None = Field(None, description="where the video was written, when the server has an output URL")


class EditStatus(WorkStatus):
    status: str = Field(description=" / ".join(EDIT_STATES))
    progress: float = Field(description="fraction done: the tuning (by optimizer steps) and each stage")
    tuning: TuningState
    videos: list[EditVideo] = Field(default_factory=list, description="one per prompt, when done")
