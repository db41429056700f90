"""Typed access to what create_app puts on `app.state`, as FastAPI dependencies.

Routes name what they need in their signature (`runner: RunnerDep`); helpers that take
the request call the accessor functions (`deps.runner(request)`). None of these take
parameters of their own, so none appear in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from service.config import Settings
from service.inference import LoadedModel, ModelRunner
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.preprocessing import DecodeLimits

T = TypeVar("T")


def runner(request: Request) -> ModelRunner:
    """The app's model runner (loading, serving and reloading the bundle)."""
    served: ModelRunner = request.app.state.runner
    return served


def settings(request: Request) -> Settings:
    """The app's settings (service.config)."""
    configured: Settings = request.app.state.settings
    return configured


def metrics(request: Request) -> Metrics:
    """The app's Prometheus metrics."""
    registry: Metrics = request.app.state.metrics
    return registry


def limits(request: Request) -> DecodeLimits:
    """The app's decode limits, with the decode memory budget its decodes share."""
    decode: DecodeLimits = request.app.state.limits
    return decode


def lifecycle(request: Request) -> Lifecycle:
    """Start-up, draining and reload signals of the app."""
    states: Lifecycle = request.app.state.lifecycle
    return states


def ready_model(request: Request) -> LoadedModel:
    """The model this request uses: the one pinned on it (predict's `admitted`), else the
    one serving now, pinned from here on (503 model_not_ready when none is ready)."""
    model: LoadedModel | None = getattr(request.state, "model", None)
    if model is None:
        model = request.state.model = runner(request).require_model()
    return model


def _on_the_loop(accessor: Callable[[Request], T]) -> Callable[[Request], Awaitable[T]]:
    """`accessor` as an async dependency: FastAPI runs a plain `def` dependency in its
    thread pool, a hop there and back per dependency per request for what is one
    attribute read."""

    async def dependency(request: Request) -> T:
        return accessor(request)

    dependency.__name__ = dependency.__qualname__ = accessor.__name__
    dependency.__doc__ = accessor.__doc__
    return dependency


RunnerDep = Annotated[ModelRunner, Depends(_on_the_loop(runner))]
SettingsDep = Annotated[Settings, Depends(_on_the_loop(settings))]
MetricsDep = Annotated[Metrics, Depends(_on_the_loop(metrics))]
LimitsDep = Annotated[DecodeLimits, Depends(_on_the_loop(limits))]
LifecycleDep = Annotated[Lifecycle, Depends(_on_the_loop(lifecycle))]
ReadyModelDep = Annotated[LoadedModel, Depends(_on_the_loop(ready_model))]
