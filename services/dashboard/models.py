"""Request and answer bodies of the dashboard API. Requests refuse unknown fields; answers are
what the OpenAPI document promises (it is generated from these classes)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{2,31}$"
EMAIL_PATTERN = r"^[^@\s]{1,64}@[^@\s]{1,189}$"

Username = Annotated[str, StringConstraints(pattern=USERNAME_PATTERN)]
Email = Annotated[str, StringConstraints(max_length=254, pattern=EMAIL_PATTERN)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=256)]
TelegramUserId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    pass


# --- errors -------------------------------------------------------------------------------------


class ErrorDetail(Out):
    model_config = ConfigDict(extra="allow")
    code: str
    message: str
    field: str | None = None


class ErrorBody(Out):
    error: ErrorDetail


# --- public -------------------------------------------------------------------------------------


class Links(Out):
    control_ui: str = "/ui/"  # on the proxy's origin (absolute URL when it is known)
    chat_completions: str = "/api/chat/completions"


class MetaOut(Out):
    signup_open: bool
    password_min_length: int
    models: list[str]
    default_model: str
    public_origins: list[str]
    links: Links


class HealthOut(Out):
    ok: bool
    store: str
    nats: str


# --- accounts -----------------------------------------------------------------------------------


class SignupIn(In):
    username: Username
    email: Email | None = None
    password: Password


class LoginIn(In):
    login: Annotated[str, StringConstraints(min_length=1, max_length=254)]
    password: Password


class UserOut(Out):
    id: str
    username: str
    email: str | None
    role: Literal["user", "operator"]
    created_at: datetime


class SessionInfo(Out):
    expires_at: datetime


class AuthOut(Out):
    user: UserOut
    session: SessionInfo


class MeOut(AuthOut):
    links: Links


class PasswordIn(In):
    current_password: Password
    new_password: Password


class DeleteMeIn(In):
    password: Password
    confirm: Annotated[str, StringConstraints(max_length=64)]
    purge: bool = False


class DeletedOut(Out):
    deleted: bool
    purge: bool
    request_id: str | None


# --- the agent ----------------------------------------------------------------------------------


class StateStep(Out):
    state: str
    at: datetime
    elapsed_s: float


class AgentError(Out):
    reason: str
    message: str


class AgentOut(Out):
    state: str
    health: str
    bot_username: str | None
    bot_link: str | None
    model: str | None
    created_at: datetime | None
    updated_at: datetime | None
    history: list[StateStep]
    error: AgentError | None


class AgentEnvelope(Out):
    agent: AgentOut | None


class CreateAgentIn(In):
    bot_token: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    model: ModelName | None = None
    telegram_allow_from: list[TelegramUserId] = Field(default_factory=list, max_length=64)


class CreatedAgentOut(Out):
    request_id: str
    state: str
    bot_username: str


class UpdateAgentIn(In):
    model: ModelName


class RequestOut(Out):
    request_id: str


class UsageDay(Out):
    day: str
    tokens: int
    prompt_tokens: int
    completion_tokens: int
    requests: int


class UsageMonth(Out):
    month: str
    tokens: int
    requests: int


class BudgetOut(Out):
    requests_per_minute: int | None
    tokens_per_day: int | None
    tokens_per_month: int | None
    soft_ratio: float


class UsageOut(Out):
    today: UsageDay
    month: UsageMonth
    budget: BudgetOut


# --- pairing and chat ---------------------------------------------------------------------------

RequestIdStr = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]


class PairingRequest(Out):
    request_id: str
    channel: str
    account_id: str
    sender_id: str
    metadata: dict[str, Any]
    created_at: str | None
    expires_at: str | None


class PairingListOut(Out):
    requests: list[PairingRequest]


class PairingActionIn(In):
    request_id: RequestIdStr


class OkOut(Out):
    ok: bool


class ChatSession(Out):
    key: str
    title: str | None
    updated_at: str | None


class ChatSessionsOut(Out):
    sessions: list[ChatSession]


class ChatMessage(Out):
    role: str
    text: str
    at: str | None


class ChatHistoryOut(Out):
    messages: list[ChatMessage]


# The gateway's session key (printable ASCII): passed on as a JSON string, never into a path.
SessionKey = Annotated[str, StringConstraints(pattern=r"^[!-~]{1,256}$")]


class ChatHistoryQuery(In):
    session: SessionKey
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class ChatAbortIn(In):
    session: SessionKey


class ChatCompletionIn(BaseModel):
    """An OpenAI chat-completions request; other OpenAI fields pass through to the gateway."""

    model_config = ConfigDict(extra="allow")
    model: ModelName
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=1000)
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)


# --- files --------------------------------------------------------------------------------------


class FileOut(Out):
    name: str
    content: str
    size: int
    etag: str
    updated_at: datetime | None


class FileIn(In):
    content: str
    etag: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None


# --- API keys -----------------------------------------------------------------------------------

Scope = Literal["chat", "tools", "ws", "ui"]


class KeyOut(Out):
    id: str
    scopes: list[str]
    created_at: datetime | None
    expires_at: datetime | None
    state: Literal["active", "revoked", "expired"]


class KeysOut(Out):
    keys: list[KeyOut]


class CreateKeyIn(In):
    scopes: list[Scope] = Field(min_length=1, max_length=4)
    expires_days: Annotated[int, Field(ge=1, le=3650)] | None = None


class CreatedKeyOut(Out):
    id: str
    key: str
    scopes: list[str]
    expires_at: datetime | None


# --- operator -----------------------------------------------------------------------------------


class AdminUser(UserOut):
    disabled: bool


class AgentBrief(Out):
    state: str
    health: str
    bot_username: str | None


class UsageBrief(Out):
    today_tokens: int
    month_tokens: int


class AdminAccount(Out):
    user: AdminUser
    agent: AgentBrief | None
    usage: UsageBrief


class AdminAccountsOut(Out):
    accounts: list[AdminAccount]


class AdminInstance(Out):
    user_id: str
    state: str
    health: str
    bot_username: str | None
    model: str | None
    updated_at: datetime | None
    account: str | None


class AdminInstancesOut(Out):
    instances: list[AdminInstance]


class ProviderOut(Out):
    name: str
    base_url: str | None
    api: str | None
    models: list[str]
    state: str | None


class ProvidersOut(Out):
    providers: list[ProviderOut]


class TempPasswordOut(Out):
    temporary_password: str


class AuditRecord(Out):
    at: datetime
    actor: str
    actor_name: str | None
    action: str
    target: str
    detail: dict[str, Any]


class AuditOut(Out):
    records: list[AuditRecord]


class AuditQuery(In):
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class PurgeQuery(In):
    purge: bool = False
