"""Dependencies of the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.auth import ADMIN, GENERATE, Principal
from server.engine import Engine
from server.generation import GenerationService
from server.jobs import JobManager
from server.masking import MaskResolver
from server.metrics import Metrics
from server.profiles import ProfileAdmin
from server.state import ServerState

__all__ = ["AdminKey", "DocsKey", "EngineDep", "GenerateKey", "JobsDep", "MetricsDep",
           "MetricsKey", "ProfilesDep", "ResolverDep", "ServiceDep", "StateDep"]


def _state(request: Request) -> ServerState:
    return request.app.state.monet


StateDep = Annotated[ServerState, Depends(_state)]


def _engine(state: StateDep) -> Engine:
    return state.engine


def _service(state: StateDep) -> GenerationService:
    return state.service


def _resolver(state: StateDep) -> MaskResolver:
    return state.resolver


def _profiles(state: StateDep) -> ProfileAdmin:
    return state.admin


def _jobs(state: StateDep) -> JobManager:
    return state.jobs


def _metrics(state: StateDep) -> Metrics:
    return state.metrics


EngineDep = Annotated[Engine, Depends(_engine)]
ServiceDep = Annotated[GenerationService, Depends(_service)]
ResolverDep = Annotated[MaskResolver, Depends(_resolver)]
ProfilesDep = Annotated[ProfileAdmin, Depends(_profiles)]
JobsDep = Annotated[JobManager, Depends(_jobs)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]

_bearer = HTTPBearer(auto_error=False, description="An API key (generate or admin scope).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _scope(scope: str):
    def require(request: Request, state: StateDep, credentials: Credentials) -> Principal:
        principal = state.keys.require(credentials.credentials if credentials else None, scope)
        request.scope.setdefault("state", {})["monet_principal"] = principal.name
        return principal

    return require


def _unless_public(setting: str):
    """The generate scope, unless settings.<setting> opens the endpoint to everyone."""
    scoped = _scope(GENERATE)

    def require(request: Request, state: StateDep, credentials: Credentials) -> Principal | None:
        if getattr(state.settings, setting):
            return None
        return scoped(request, state, credentials)

    return require


GenerateKey = Annotated[Principal, Depends(_scope(GENERATE))]
AdminKey = Annotated[Principal, Depends(_scope(ADMIN))]
MetricsKey = Annotated[Principal | None, Depends(_unless_public("public_metrics"))]
DocsKey = Annotated[Principal | None, Depends(_unless_public("public_docs"))]
